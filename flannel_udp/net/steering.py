"""Keeping every flow on one packet thread when the udp backend runs several (-udp-workers): the kernel picks the
thread, by flow, in both directions, so no flow's packets are ever handled by two threads and reordered between them.

* Out (flannel0 -> UDP): flannel0 has one queue per pump (IFF_MULTI_QUEUE) and an eBPF steering program
  (TUNSETSTEERINGEBPF) that returns a symmetric hash of the inner packet's addresses, protocol and ports; the kernel
  takes it modulo the number of queues. A flow and its replies hash alike. Without the program (no CAP_BPF), the
  TUN's own flow table steers: it sends a flow to the queue its received packets were last written on.
* Between nodes: pump k sends from a source port of its own, p_k ≡ k (mod N), instead of the listening port, so the
  outer 4-tuple names the sending pump: UDP GRO on the receiver merges only datagrams of one sending pump.
* In (UDP -> flannel0): the receiving sockets, bound in pump order to the listening port with SO_REUSEPORT, form one
  group whose classic BPF program (SO_ATTACH_REUSEPORT_CBPF) picks socket (outer source port mod N). With the same N on
  both nodes a flow is on the same pump index everywhere; with different N each direction still stays on one pump.
  Upstream's peers send from the listening port: all their traffic is one pump's, in order, as it is upstream.

The programs are a handful of instructions, assembled here (no compiler at run time).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import socket
import struct

log = logging.getLogger(__name__)

SO_ATTACH_REUSEPORT_CBPF = 51
TUNSETSTEERINGEBPF = 0x800454E0  # _IOR('T', 224, int)
BPF_PROG_LOAD, BPF_PROG_TYPE_SOCKET_FILTER = 5, 1
BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}
SKF_NET_OFF = -0x100000  # a classic BPF load at this offset reads from the network header

# Classic and extended BPF opcodes (linux/bpf_common.h, linux/bpf.h).
LD, LDX, ALU, JMP, RET, ALU64 = 0x00, 0x01, 0x04, 0x05, 0x06, 0x07
W, H, B = 0x00, 0x08, 0x10
ABS, IND = 0x20, 0x40
ADD, MUL, AND, LSH, RSH, MOD, XOR, MOV = 0x00, 0x20, 0x50, 0x60, 0x70, 0x90, 0xA0, 0xB0
K, X = 0x00, 0x08
JA, JEQ, JNE, EXIT = 0x00, 0x10, 0x50, 0x90
RET_A = 0x10
GOLDEN = 0x9E3779B1  # Knuth's multiplicative hash constant: spreads nearby port numbers over the queues


class SteeringError(RuntimeError):
    pass


def reuseport_program(header_length: int, workers: int) -> bytes:
    """Classic BPF for the receiving group: socket index = outer UDP source port mod workers (the data starts at the
    UDP payload; the source port is read through the network header, header_length bytes before the UDP header)."""
    insns = [
        (LD | H | ABS, 0, 0, (SKF_NET_OFF + header_length) & 0xFFFFFFFF),
        (ALU | MOD | K, 0, 0, workers),
        (RET | RET_A, 0, 0, 0),
    ]
    return b"".join(struct.pack("=HBBI", *insn) for insn in insns)


def attach_reuseport_steering(sock: socket.socket, workers: int) -> None:
    """Attach the group's program through one of its sockets (it serves the whole group)."""
    header_length = 40 if sock.family == socket.AF_INET6 else 20  # no options or extension headers from peers
    program = ctypes.create_string_buffer(reuseport_program(header_length, workers))
    fprog = struct.pack("@HP", len(program.raw) // 8, ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


class _Program:
    """A tiny eBPF assembler: instructions with labels, jumps resolved at the end."""

    def __init__(self) -> None:
        self.insns: list[tuple[int, int, int, int | str, int]] = []  # code, dst, src, offset or label, imm
        self.labels: dict[str, int] = {}

    def op(self, code: int, dst: int = 0, src: int = 0, imm: int = 0, off: int | str = 0) -> None:
        self.insns.append((code, dst, src, off, imm))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def load(self, size: int, offset: int) -> None:
        """r0 = the packet's bytes at offset (network order; a load past the end ends the program with 0)."""
        self.op(LD | size | ABS, imm=offset)

    def fold_ports(self, at: int | None = None) -> None:
        """r7 ^= source port ^ destination port of the 32-bit word at `at` (or at r9, the IPv4 header length)."""
        if at is None:
            self.op(LD | W | IND, src=9)
        else:
            self.load(W, at)
        self.op(ALU | MOV | X, dst=2, src=0)
        self.op(ALU | RSH | K, dst=2, imm=16)
        self.op(ALU | AND | K, dst=0, imm=0xFFFF)
        self.op(ALU | XOR | X, dst=0, src=2)
        self.op(ALU | XOR | X, dst=7, src=0)

    def encode(self) -> bytes:
        out = []
        for index, (code, dst, src, off, imm) in enumerate(self.insns):
            if isinstance(off, str):
                off = self.labels[off] - index - 1
            imm = imm - (1 << 32) if imm >= 1 << 31 else imm
            out.append(struct.pack("<BBhi", code, (src << 4) | dst, off, imm))
        return b"".join(out)


def flow_hash_program() -> bytes:
    """eBPF for flannel0's queue choice: a hash of the inner packet that is the same for both directions of a flow
    (addresses XORed, ports XORed, protocol), mixed by a multiplication; fragments hash without ports."""
    p = _Program()
    p.op(ALU64 | MOV | X, dst=6, src=1)  # r6 = the packet, as the legacy loads want it
    p.load(B, 0)
    p.op(ALU | RSH | K, dst=0, imm=4)
    p.op(JMP | JEQ | K, dst=0, imm=6, off="ipv6")
    p.op(JMP | JNE | K, dst=0, imm=4, off="other")
    p.load(W, 12)
    p.op(ALU | MOV | X, dst=7, src=0)
    p.load(W, 16)
    p.op(ALU | XOR | X, dst=7, src=0)
    p.load(B, 9)
    p.op(ALU | MOV | X, dst=8, src=0)
    p.load(H, 6)
    p.op(ALU | AND | K, dst=0, imm=0x3FFF)  # more-fragments flag or an offset: no ports to read
    p.op(JMP | JNE | K, dst=0, imm=0, off="mix")
    p.load(B, 0)
    p.op(ALU | AND | K, dst=0, imm=0x0F)
    p.op(ALU | LSH | K, dst=0, imm=2)
    p.op(ALU | MOV | X, dst=9, src=0)
    p.op(JMP | JEQ | K, dst=8, imm=6, off="ports4")
    p.op(JMP | JEQ | K, dst=8, imm=17, off="ports4")
    p.op(JMP | JA, off="mix")
    p.label("ports4")
    p.fold_ports()
    p.op(JMP | JA, off="mix")
    p.label("ipv6")
    p.load(W, 8)
    p.op(ALU | MOV | X, dst=7, src=0)
    for offset in range(12, 40, 4):
        p.load(W, offset)
        p.op(ALU | XOR | X, dst=7, src=0)
    p.load(B, 6)
    p.op(ALU | MOV | X, dst=8, src=0)
    p.op(JMP | JEQ | K, dst=8, imm=6, off="ports6")
    p.op(JMP | JEQ | K, dst=8, imm=17, off="ports6")
    p.op(JMP | JA, off="mix")
    p.label("ports6")
    p.fold_ports(40)
    p.label("mix")
    p.op(ALU | XOR | X, dst=7, src=8)
    p.op(ALU | MUL | K, dst=7, imm=GOLDEN)
    p.op(ALU | RSH | K, dst=7, imm=16)
    p.op(ALU | MOV | X, dst=0, src=7)
    p.op(JMP | EXIT)
    p.label("other")
    p.op(ALU | MOV | K, dst=0, imm=0)
    p.op(JMP | EXIT)
    return p.encode()


def load_socket_filter(program: bytes) -> int:
    """bpf(BPF_PROG_LOAD) of an eBPF socket filter; its fd. SteeringError with the verifier's words if refused."""
    number = BPF_SYSCALL.get(os.uname().machine)
    if number is None:
        raise SteeringError(f"no bpf() system call number known for {os.uname().machine}")
    insns = ctypes.create_string_buffer(program)
    license = ctypes.create_string_buffer(b"GPL")
    verifier_log = ctypes.create_string_buffer(4096)
    attr = struct.pack(
        "=IIQQIIQII",
        BPF_PROG_TYPE_SOCKET_FILTER,
        len(program) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license),
        1,
        len(verifier_log),
        ctypes.addressof(verifier_log),
        0,
        0,
    ).ljust(128, b"\0")
    attr_buffer = ctypes.create_string_buffer(attr, len(attr))
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(number, BPF_PROG_LOAD, attr_buffer, len(attr))
    if fd < 0:
        error = ctypes.get_errno()
        detail = verifier_log.value.decode(errors="replace").strip().splitlines()
        raise SteeringError(f"{os.strerror(error)}{': ' + detail[-1] if detail else ''}")
    return fd


def steer_tun_by_flow(tun_fd: int) -> None:
    """Attach the flow-hash program to a multi-queue TUN (any of its queue fds); SteeringError if it cannot be."""
    prog_fd = load_socket_filter(flow_hash_program())
    try:
        fcntl.ioctl(tun_fd, TUNSETSTEERINGEBPF, struct.pack("i", prog_fd))
    except OSError as e:
        raise SteeringError(f"TUNSETSTEERINGEBPF: {e.strerror}") from None
    finally:
        os.close(prog_fd)  # the device holds its own reference
