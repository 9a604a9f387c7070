"""Sequence-numbered UDP flows for the ordering tests: `send HOST PORT FLOWS COUNT` sends COUNT datagrams on each of
FLOWS flows (one source port each), interleaved; `receive PORT SECONDS` prints, as JSON, per source port how many
arrived and how many arrived after a later one of their flow (an inversion: the flow was reordered)."""

import json
import select
import socket
import struct
import sys
import time


def send(host: str, port: int, flows: int, count: int) -> None:
    socks = []
    for _ in range(flows):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((host, port))
        socks.append(sock)
    payload = b"x" * 200
    for seq in range(count):
        for sock in socks:
            try:
                sock.send(struct.pack("!I", seq) + payload)
            except OSError:
                pass  # a full buffer drops a datagram: loss is allowed, reordering is not
        if seq % 64 == 63:
            time.sleep(0.001)  # bounded rate: the test is about order, not about overload


def receive(port: int, seconds: float) -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("::", port))
    print("ready", flush=True)
    flows: dict[str, list[int]] = {}  # source port -> [received, inversions, highest]
    deadline, idle_until = time.monotonic() + seconds, None
    while time.monotonic() < deadline and (idle_until is None or time.monotonic() < idle_until):
        if not select.select([sock], [], [], 0.2)[0]:
            continue
        data, address = sock.recvfrom(2048)
        seq = struct.unpack("!I", data[:4])[0]
        state = flows.setdefault(str(address[1]), [0, 0, -1])
        state[0] += 1
        if seq < state[2]:
            state[1] += 1
        state[2] = max(state[2], seq)
        idle_until = time.monotonic() + 1.0
    print(json.dumps({port: state[:2] for port, state in flows.items()}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        receive(int(sys.argv[2]), float(sys.argv[3]))
