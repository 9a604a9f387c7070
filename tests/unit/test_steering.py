"""The steering programs of the packet threads (flannel_udp/net/steering.py), run here by a small interpreter of the
instructions they use: a flow and its replies hash alike, distinct flows spread over the threads, fragments and
non-IP stay put; the kernel loads the program (the verifier accepts it)."""

import os
import random
import struct

import pytest
from scapy.all import ICMP, IP, TCP, UDP, IPv6, raw

from flannel_udp.net import steering as st


def run_ebpf(program: bytes, packet: bytes) -> int:
    """The subset of eBPF the steering program uses, with the legacy loads' semantics (out of range: return 0)."""
    insns = [struct.unpack("<BBhi", program[i : i + 8]) for i in range(0, len(program), 8)]
    regs = [0] * 11
    pc = 0
    while True:
        code, regs_byte, off, imm = insns[pc]
        dst, src = regs_byte & 0x0F, regs_byte >> 4
        pc += 1
        cls = code & 0x07
        if cls == st.LD:
            size = {st.W: 4, st.H: 2, st.B: 1}[code & 0x18]
            at = imm + (regs[src] if code & 0xE0 == st.IND else 0)
            if at < 0 or at + size > len(packet):
                return 0
            regs[0] = int.from_bytes(packet[at : at + size], "big")
        elif cls in (st.ALU, st.ALU64):
            operand = regs[src] if code & st.X else imm & 0xFFFFFFFF
            result = alu(code & 0xF0, regs[dst], operand)
            regs[dst] = result & (0xFFFFFFFF if cls == st.ALU else 0xFFFFFFFFFFFFFFFF)
        elif cls == st.JMP:
            op = code & 0xF0
            if op == st.EXIT:
                return regs[0]
            taken = op == st.JA or (op == st.JEQ and regs[dst] == imm) or (op == st.JNE and regs[dst] != imm)
            if taken:
                pc += off
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")


def alu(op: int, value: int, operand: int) -> int:
    if op == st.MOV:
        return operand
    if op == st.RSH:
        return value >> operand
    if op == st.LSH:
        return value << operand
    if op == st.AND:
        return value & operand
    if op == st.XOR:
        return value ^ operand
    assert op == st.MUL, f"unexpected ALU operation {op:#x}"
    return value * operand


PROGRAM = st.flow_hash_program()


def queue(packet, queues: int = 4) -> int:
    return (run_ebpf(PROGRAM, raw(packet)) & 0xFFFF) % queues  # the kernel keeps 16 bits, then takes the modulus


@pytest.mark.parametrize(
    "forward, reverse",
    [
        (
            IP(src="10.5.1.2", dst="10.5.2.3") / TCP(sport=40000, dport=5201),
            IP(src="10.5.2.3", dst="10.5.1.2") / TCP(sport=5201, dport=40000),
        ),
        (
            IP(src="10.5.1.2", dst="10.5.2.3", options=b"\x01\x01\x01\x00") / UDP(sport=9, dport=53),
            IP(src="10.5.2.3", dst="10.5.1.2") / UDP(sport=53, dport=9),
        ),
        (
            IPv6(src="fd00:1::2", dst="fd00:2::3") / TCP(sport=40000, dport=5201),
            IPv6(src="fd00:2::3", dst="fd00:1::2") / TCP(sport=5201, dport=40000),
        ),
    ],
)
def test_a_flow_and_its_replies_hash_alike(forward, reverse):
    assert run_ebpf(PROGRAM, raw(forward)) == run_ebpf(PROGRAM, raw(reverse))


def test_flows_between_two_pods_spread_over_the_threads():
    rng = random.Random(7)
    ports = rng.sample(range(32768, 61000), 64)
    for make in (IP, IPv6):
        src, dst = ("10.5.1.2", "10.5.2.3") if make is IP else ("fd00:1::2", "fd00:2::3")
        counts = [0] * 4
        for port in ports:
            counts[queue(make(src=src, dst=dst) / TCP(sport=port, dport=5201))] += 1
        assert min(counts) >= 6, counts  # 64 flows over 4 threads: none starved


def test_fragments_keep_to_the_addresses_and_odd_packets_do_not_fail():
    first = IP(src="10.5.1.2", dst="10.5.2.3", flags="MF") / UDP(sport=1000, dport=2000) / (b"x" * 40)
    later = IP(src="10.5.1.2", dst="10.5.2.3", frag=3, proto=17) / (b"y" * 40)
    assert run_ebpf(PROGRAM, raw(first)) == run_ebpf(PROGRAM, raw(later))  # one datagram's pieces: one thread
    assert run_ebpf(PROGRAM, raw(IP(src="10.5.1.2", dst="10.5.2.3") / ICMP())) >= 0
    assert run_ebpf(PROGRAM, b"\x45\x00") == 0 and run_ebpf(PROGRAM, b"") == 0 and run_ebpf(PROGRAM, b"\x20" * 40) == 0


def test_the_reuseport_program_picks_by_source_port():
    insns = [struct.unpack("=HBBI", st.reuseport_program(20, 3)[i : i + 8]) for i in range(0, 24, 8)]
    assert insns[0] == (st.LD | st.H | st.ABS, 0, 0, (st.SKF_NET_OFF + 20) & 0xFFFFFFFF)
    assert insns[1] == (st.ALU | st.MOD | st.K, 0, 0, 3) and insns[2][0] == st.RET | st.RET_A


@pytest.mark.skipif(os.geteuid() != 0, reason="loading a BPF program needs CAP_BPF")
def test_the_kernel_verifier_accepts_the_flow_hash_program():
    fd = st.load_socket_filter(PROGRAM)
    assert fd >= 0
    os.close(fd)
