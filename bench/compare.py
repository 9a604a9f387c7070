"""Side-by-side data-plane comparison in one run: routing, kernel VXLAN, the udp backend with and without offloads.

Each variant gets a fresh pair of host namespaces on the same underlay (veth through a bridge), one pod per host, and
the same iperf3 runs; the figures are printed as absolute values and as ratios to kernel VXLAN of the same run, because
this machine is shared and noisy. Routed and VXLAN are set up by hand here, as flannel's host-gw and vxlan backends set
them up (upstream pkg/backend/hostgw/hostgw.go, pkg/backend/vxlan/vxlan_network.go), so that the udp backend is
compared with the kernel on identical plumbing.
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import cpu_seconds
from testbed.cluster import Host, Testbed, in_ns

NETWORK = ipaddress.ip_network("10.244.0.0/16")


def fake_subnet_env(host: Host, index: int, mtu: int) -> ipaddress.IPv4Network:
    subnet = ipaddress.ip_network(f"10.244.{index}.0/24")
    with open(host.subnet_file, "w") as f:
        f.write(
            f"FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET={subnet.network_address + 1}/24\nFLANNEL_MTU={mtu}\n"
            "FLANNEL_IPMASQ=false\n"
        )
    return subnet


def setup_routed(bed: Testbed) -> None:
    subnets = [fake_subnet_env(h, i + 1, bed.mtu) for i, h in enumerate(bed.hosts)]
    for i, host in enumerate(bed.hosts):
        for j, other in enumerate(bed.hosts):
            if i != j:
                in_ns(host.ns, "ip", "route", "replace", str(subnets[j]), "via", str(other.address), "dev", "eth0")


def setup_vxlan(bed: Testbed) -> None:
    mtu = bed.mtu - 50
    subnets = [fake_subnet_env(h, i + 1, mtu) for i, h in enumerate(bed.hosts)]
    macs = [f"02:00:00:00:00:{i + 1:02x}" for i in range(len(bed.hosts))]
    for i, host in enumerate(bed.hosts):
        in_ns(
            host.ns,
            "ip",
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            str(host.address),
            "dev",
            "eth0",
            "dstport",
            "8472",
            "nolearning",
        )
        in_ns(host.ns, "ip", "link", "set", "flannel.1", "address", macs[i], "mtu", str(mtu), "up")
        in_ns(host.ns, "ip", "addr", "add", f"{subnets[i].network_address}/32", "dev", "flannel.1")
        for j, other in enumerate(bed.hosts):
            if i == j:
                continue
            gw = str(subnets[j].network_address)
            in_ns(host.ns, "ip", "neigh", "replace", gw, "lladdr", macs[j], "dev", "flannel.1", "nud", "permanent")
            in_ns(
                host.ns,
                "bridge",
                "fdb",
                "append",
                macs[j],
                "dev",
                "flannel.1",
                "dst",
                str(other.address),
                "self",
                "permanent",
            )
            in_ns(host.ns, "ip", "route", "replace", str(subnets[j]), "via", gw, "dev", "flannel.1", "onlink")


def setup_udp(bed: Testbed, *flags: str) -> None:
    bed.write_config({"Network": str(NETWORK), "Backend": {"Type": "udp"}})
    for host in bed.hosts:
        bed.start_node(host, "--healthz-port=8471", "--healthz-ip=127.0.0.1", *flags)
    time.sleep(0.5)  # every node sees every lease


def setup_udp_plain(bed: Testbed) -> None:
    """The udp backend with every offload off (no TUN TSO/coalescing, no UDP GSO/GRO): before the offload work."""
    setup_udp(bed, "--udp-offload=false")


# The ceiling a userspace data plane can be held to here (../shared/reference): a one-peer C tunnel in the same wire
# format with the same offloads and no checks. Built on the fly when its source is beside the project; not product code.
LIMIT_TUNNEL_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "limit-tunnel.c"
_limit_tunnel_binary: str | None = None


def limit_tunnel_binary() -> str:
    global _limit_tunnel_binary
    if _limit_tunnel_binary is None:
        if not LIMIT_TUNNEL_SOURCE.exists() or shutil.which("gcc") is None:
            raise RuntimeError(f"limit-c needs gcc and {LIMIT_TUNNEL_SOURCE}")
        folder = tempfile.mkdtemp(prefix="flannel-udp-bench-")
        atexit.register(shutil.rmtree, folder, True)  # the build goes with the run, whichever way it ends
        out = os.path.join(folder, "limit-tunnel")
        subprocess.run(["gcc", "-O2", "-o", out, str(LIMIT_TUNNEL_SOURCE)], check=True)
        _limit_tunnel_binary = out
    return _limit_tunnel_binary


def setup_limit_c(bed: Testbed, priority: int = 0) -> None:
    """The reference tunnel on both hosts (priority > 0: its thread at that real-time priority, as -udp-priority)."""
    mtu = bed.mtu - 28
    realtime = ["chrt", "-f", str(priority)] if priority else []
    subnets = [fake_subnet_env(h, i + 1, mtu) for i, h in enumerate(bed.hosts)]
    for i, host in enumerate(bed.hosts):
        peer = bed.hosts[1 - i]
        bed.popen(
            host.ns,
            *realtime,
            limit_tunnel_binary(),
            "flannel0",
            str(host.address),
            "8285",
            str(peer.address),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while in_ns(host.ns, "ip", "link", "show", "flannel0", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("limit-tunnel did not create flannel0")
            time.sleep(0.05)
        in_ns(host.ns, "ip", "addr", "add", f"{subnets[i].network_address}/32", "dev", "flannel0")
        in_ns(host.ns, "ip", "link", "set", "flannel0", "mtu", str(mtu), "up")
        in_ns(host.ns, "ip", "route", "add", str(NETWORK), "dev", "flannel0")


VARIANTS = {
    "routed": setup_routed,
    "vxlan": setup_vxlan,
    "udp": setup_udp,
    "udp-plain": setup_udp_plain,
    "limit-c": setup_limit_c,
}


def iperf(bed: Testbed, client, server, *args: str, seconds: float) -> dict:
    srv = bed.popen(server.ns, "iperf3", "-s", "-1", stdout=open(os.devnull, "w"), stderr=open(os.devnull, "w"))
    time.sleep(0.3)
    try:
        out = in_ns(
            client.ns,
            "iperf3",
            "-c",
            str(server.address),
            "-t",
            str(seconds),
            "-J",
            *args,
            check=False,
            timeout=seconds + 30,
        ).stdout
        return json.loads(out)
    finally:
        srv.wait(10)


def measure(variant: str, seconds: float, offloads: bool) -> dict:
    with Testbed(hosts=2) as bed:
        bed.set_underlay_offloads(offloads)
        VARIANTS[variant](bed)
        a, b = (bed.add_pod(h) for h in bed.hosts)
        if not bed.ping(a.ns, b.address, count=3, interval=0.2):
            raise RuntimeError(f"{variant}: pods cannot reach each other\n{bed.logs()}")
        daemons = [h.process for h in bed.hosts if h.process is not None]
        cpu_before = sum(cpu_seconds(p.pid) for p in daemons) if daemons else 0.0
        tcp = iperf(bed, a, b, seconds=seconds)
        moved = tcp["end"]["sum_received"]["bytes"]
        cpu_after = sum(cpu_seconds(p.pid) for p in daemons) if daemons else 0.0
        udp = iperf(bed, a, b, "-u", "-b", "0", "-l", "64", seconds=min(seconds, 3))
        udp_sum = udp["end"]["sum"]
        received_pps = udp_sum["packets"] * (1 - udp_sum["lost_percent"] / 100) / udp_sum["seconds"]
        return {
            "tcp_gbps": tcp["end"]["sum_received"]["bits_per_second"] / 1e9,
            "tcp_retransmits": tcp["end"]["sum_sent"].get("retransmits"),
            "udp64_sent_pps": udp_sum["packets"] / udp_sum["seconds"],
            "udp64_received_pps": received_pps,
            "daemon_cpu_s_per_gb": (cpu_after - cpu_before) / (moved / 1e9) if daemons and moved else None,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5, help="iperf3 TCP duration per variant")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument(
        "--variants", default="routed,vxlan,udp,udp-plain", help="comma list of: " + ", ".join(VARIANTS)
    )
    parser.add_argument("--offloads", choices=["on", "off", "both"], default="on", help="underlay veth TSO/GSO/GRO")
    parser.add_argument("--json", help="write the raw figures here")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise SystemExit(
            f"{parser.prog}: unknown variant(s) {', '.join(unknown) or '(none given)'} (one of: {', '.join(VARIANTS)})"
        )
    settings = ["on", "off"] if args.offloads == "both" else [args.offloads]
    print(
        f"# {time.strftime('%Y-%m-%d')} kernel {platform.release()}, {os.cpu_count()} cores, iperf3 single TCP stream "
        f"{args.seconds:g}s and 64-byte UDP, median of {args.repeat}",
        flush=True,
    )
    results: dict = {}
    for setting in settings:
        for round_ in range(args.repeat):
            for variant in variants:  # interleaved, so drift on a shared machine hits every variant alike
                figures = measure(variant, args.seconds, setting == "on")
                results.setdefault(setting, {}).setdefault(variant, []).append(figures)
                print(
                    f"  offloads {setting} round {round_ + 1} {variant:9} {figures['tcp_gbps']:6.2f} Gbit/s  "
                    f"{figures['udp64_received_pps'] / 1e3:7.0f} kpps",
                    file=sys.stderr,
                    flush=True,
                )
    for setting in settings:
        rows = results[setting]
        med = {
            v: {k: statistics.median(r[k] for r in rows[v]) if rows[v][0][k] is not None else None for k in rows[v][0]}
            for v in variants
        }
        base = med.get("vxlan")
        print(f"\nunderlay offloads {setting}:")
        print(
            f"{'variant':9} {'TCP Gbit/s':>10} {'x vxlan':>8} {'64B rx kpps':>12} {'x vxlan':>8} "
            f"{'daemon CPU s/GB':>16}"
        )
        for v in variants:
            m = med[v]
            ratio_tcp = f"{m['tcp_gbps'] / base['tcp_gbps']:.2f}" if base else "-"
            ratio_pps = f"{m['udp64_received_pps'] / base['udp64_received_pps']:.2f}" if base else "-"
            cpu = f"{m['daemon_cpu_s_per_gb']:.2f}" if m["daemon_cpu_s_per_gb"] is not None else "-"
            print(
                f"{v:9} {m['tcp_gbps']:10.2f} {ratio_tcp:>8} {m['udp64_received_pps'] / 1e3:12.0f} {ratio_pps:>8} "
                f"{cpu:>16}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
