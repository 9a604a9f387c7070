"""`python -m bench`: the backends side by side, each run as users run it (the real daemon on the embedded store), on
the same namespace underlay, in the same run. `upstream-udp` and `upstream-vxlan` are upstream's flanneld (built by
scripts/setup.sh) with that backend, on a real etcd since it has no embedded store: the program a user would otherwise
pick, measured in the same run. `wireguard-go` and `boringtun` are those WireGuard programs run as the nodes
themselves (configured with wg; built by scripts/setup.sh), beside the wireguard backend.

Per backend and underlay setting (veth defaults; TSO/GSO/GRO off): TCP with 1 and 4 streams both ways (iperf3 -J),
64-byte UDP packets per second sent and received with the loss, round-trip latency p50/p99/max (ping every 10 ms),
CPU per gigabyte (the daemons' own, and all softirq time from /proc/stat), and the daemons' resident memory. Every
figure is the median of --repeat runs with min and max, and each backend is also given as a ratio to host-gw (plain
routing) of the same run. Backends are interleaved within each repetition, because the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time

from testbed.cluster import Testbed, in_ns, wait_for

BACKENDS = ("host-gw", "vxlan", "udp", "upstream-udp", "upstream-vxlan", "wireguard", "wireguard-go", "boringtun")
UPSTREAM = "upstream-"
WIREGUARD_PROGRAMS = ("wireguard-go", "boringtun")  # userspace WireGuard run as the nodes, configured with wg
NETWORK = "10.244.0.0/16"
IPV6_NETWORK = "fd00:10:244::/56"
# What is reported, in this order: (key, label, unit, higher is better)
FIGURES = [
    ("tcp1_gbps", "TCP 1 stream", "Gbit/s", True),
    ("tcp1_reverse_gbps", "TCP 1 stream -R", "Gbit/s", True),
    ("tcp4_gbps", "TCP 4 streams", "Gbit/s", True),
    ("tcp4_reverse_gbps", "TCP 4 streams -R", "Gbit/s", True),
    ("udp64_sent_kpps", "UDP 64 B sent", "kpps", True),
    ("udp64_received_kpps", "UDP 64 B received", "kpps", True),
    ("udp64_loss_percent", "UDP 64 B loss", "%", False),
    ("rtt_p50_ms", "RTT p50", "ms", False),
    ("rtt_p99_ms", "RTT p99", "ms", False),
    ("rtt_max_ms", "RTT max", "ms", False),
    ("daemon_cpu_s_per_gb", "daemon CPU", "s/GB", False),
    ("softirq_cpu_s_per_gb", "softirq CPU", "s/GB", False),
    ("daemon_rss_mib", "daemon RSS", "MiB", False),
]


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def target(pod, ipv6: bool) -> str:
    return str(pod.address6 if ipv6 else pod.address)


def iperf(bed: Testbed, client, server, seconds: float, *args: str, ipv6: bool = False) -> dict:
    srv = bed.popen(server.ns, "iperf3", "-s", "-1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: "5201" in in_ns(server.ns, "ss", "-ltn").stdout, 3)
    try:
        result = in_ns(
            client.ns,
            "iperf3",
            "-c",
            target(server, ipv6),
            "-t",
            str(seconds),
            "-J",
            *args,
            check=False,
            timeout=seconds + 30,
        )
        return json.loads(result.stdout)
    finally:
        try:
            srv.wait(10)
        except subprocess.TimeoutExpired:
            srv.kill()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process `pid` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def softirq_seconds() -> float:
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[7]) / os.sysconf("SC_CLK_TCK")  # cpu user nice system idle iowait irq softirq


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def latency(bed: Testbed, client, server, count: int, ipv6: bool = False) -> dict:
    out = in_ns(
        client.ns,
        "ping",
        "-i",
        "0.01",
        "-c",
        str(count),
        "-W",
        "1",
        target(server, ipv6),
        check=False,
        timeout=count * 0.05 + 20,
    ).stdout
    rtts = sorted(float(m) for m in re.findall(r"time=([\d.]+) ms", out))
    if not rtts:
        return {"rtt_p50_ms": None, "rtt_p99_ms": None, "rtt_max_ms": None}
    return {
        "rtt_p50_ms": rtts[len(rtts) // 2],
        "rtt_p99_ms": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))],
        "rtt_max_ms": rtts[-1],
    }


@contextlib.contextmanager
def two_pod_cluster(backend: str, offloads: bool = True, ipv6: bool = False, ipv6_only: bool = False):
    """A fresh 2-host cluster running the real daemon with this backend (ours, or upstream's flanneld on etcd for an
    `upstream-` backend; `NAME@FLAG@FLAG` adds node flags) and a pod on each host that reaches the other (over IPv6
    too with ipv6: a dual-stack network on the dual-stack underlay; with ipv6_only an IPv6-only network on an IPv6-only
    underlay, where upstream runs with the Kubernetes subnet manager, its one IPv6-only store); yields (testbed, pod
    a, pod b)."""
    backend, *flags = backend.split("@")  # "udp@-udp-priority=10@-udp-offload=false": a variant of ours
    flags, cpus = split_cpus(flags)  # "udp@cpus=0": the daemons confined to CPU 0
    upstream = backend.startswith(UPSTREAM)
    ipv6 = ipv6 or ipv6_only
    with Testbed(hosts=2, ipv6_only=ipv6_only) as bed:
        bed.set_underlay_offloads(offloads)
        if backend in WIREGUARD_PROGRAMS:
            yield program_cluster(bed, backend)
            return
        if upstream and not ipv6_only:
            bed.start_etcd()
        config: dict = {"Network": NETWORK, "Backend": {"Type": backend.removeprefix(UPSTREAM)}}
        if ipv6_only:
            config = {"EnableIPv4": False, "Backend": config["Backend"]}
        if ipv6:
            config.update(EnableIPv6=True, IPv6Network=IPV6_NETWORK)
        bed.write_config(config)
        if upstream and ipv6_only:
            bed.start_kube()
        for host in bed.hosts:
            bed.start_node(host, *flags, upstream=upstream, cpus=cpus)
        a, b = (bed.add_pod(h) for h in bed.hosts)
        if not wait_for(lambda: bed.ping(a.ns, target(b, ipv6), timeout=0.5), 5):
            raise RuntimeError(f"{backend}: pods cannot reach each other\n{bed.logs()}")
        yield bed, a, b


def program_cluster(bed: Testbed, kind: str):
    """Both hosts run the WireGuard program `kind` (no flanneld: the CNI plugin reads the subnet.env written for it);
    (testbed, pod a, pod b) as for the daemon's backends."""
    from testbed.wgpeers import start_wg_cluster

    peers = start_wg_cluster(bed, kind)
    for host, peer in zip(bed.hosts, peers, strict=True):
        host.process = peer.process  # `ip netns exec` became the program: its CPU and memory are measured
    a, b = (bed.add_pod(h) for h in bed.hosts)
    if not wait_for(lambda: bed.ping(a.ns, b.address, timeout=0.5), 5):
        raise RuntimeError(f"{kind}: pods cannot reach each other")
    return bed, a, b


def measure(
    backend: str, offloads: bool, seconds: float, ping_count: int, ipv6: bool = False, ipv6_only: bool = False
) -> dict:
    """Every figure of FIGURES for one backend on a fresh cluster (between the pods' IPv6 addresses with ipv6 or, on
    an IPv6-only network and underlay, ipv6_only)."""
    with two_pod_cluster(backend, offloads, ipv6, ipv6_only) as (bed, a, b):
        ipv6 = ipv6 or ipv6_only
        daemons = [h.process.pid for h in bed.hosts]
        figures: dict = {}
        moved = 0
        cpu_before, softirq_before = sum(cpu_seconds(p) for p in daemons), softirq_seconds()
        for key, args in (
            ("tcp1_gbps", ()),
            ("tcp1_reverse_gbps", ("-R",)),
            ("tcp4_gbps", ("-P", "4")),
            ("tcp4_reverse_gbps", ("-P", "4", "-R")),
        ):
            result = iperf(bed, a, b, seconds, *args, ipv6=ipv6)
            figures[key] = result["end"]["sum_received"]["bits_per_second"] / 1e9
            moved += result["end"]["sum_received"]["bytes"]
        cpu_after, softirq_after = sum(cpu_seconds(p) for p in daemons), softirq_seconds()
        gigabytes = moved / 1e9
        figures["daemon_cpu_s_per_gb"] = (cpu_after - cpu_before) / gigabytes if gigabytes else None
        figures["softirq_cpu_s_per_gb"] = (softirq_after - softirq_before) / gigabytes if gigabytes else None
        figures["daemon_rss_mib"] = max(rss_mib(p) for p in daemons)
        udp = iperf(bed, a, b, min(seconds, 3), "-u", "-b", "0", "-l", "64", ipv6=ipv6)["end"]["sum"]
        figures["udp64_sent_kpps"] = udp["packets"] / udp["seconds"] / 1e3
        figures["udp64_loss_percent"] = udp["lost_percent"]
        figures["udp64_received_kpps"] = figures["udp64_sent_kpps"] * (1 - udp["lost_percent"] / 100)
        figures.update(latency(bed, a, b, ping_count, ipv6))
        return figures


def summarise(runs: list[dict]) -> dict:
    out = {}
    for key, *_ in FIGURES:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None
    return out


def table(setting: str, summary: dict, backends: list[str]) -> str:
    base = summary.get("host-gw")
    lines = [f"\nunderlay {setting}: median [min..max] per figure; x = ratio to host-gw of the same run"]
    header = f"{'figure':24}" + "".join(f"{b:>34}" for b in backends)
    lines += [header, "-" * len(header)]
    no_ratio = {"daemon_cpu_s_per_gb", "daemon_rss_mib", "udp64_loss_percent"}  # host-gw's are ~0: a ratio says nothing
    for key, label, unit, _ in FIGURES:
        cells = []
        for backend in backends:
            f = summary[backend][key]
            if f is None:
                cells.append(f"{'-':>34}")
                continue
            ratio = ""
            if key not in no_ratio and base and base[key] and base[key]["median"]:
                ratio = f" x{f['median'] / base[key]['median']:.2f}"
            cells.append(f"{f['median']:.2f} [{f['min']:.2f}..{f['max']:.2f}]{ratio}".rjust(34))
        lines.append(f"{label + ' ' + unit:24}" + "".join(cells))
    return "\n".join(lines)


def tool_versions() -> dict:
    def first_line(*cmd):
        try:
            return subprocess.run(list(cmd), capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None

    return {
        "iperf3": first_line("iperf3", "--version"),
        "ping": first_line("ping", "-V"),
        "python": platform.python_version(),
        "etcd": first_line("etcd", "--version"),
    }


def plot(path: str, report: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: .venv/bin/pip install '.[bench]'") from None
    panels = [
        ("tcp1_gbps", "TCP 1 stream (Gbit/s)"),
        ("tcp4_gbps", "TCP 4 streams (Gbit/s)"),
        ("udp64_received_kpps", "64 B UDP received (kpps)"),
        ("rtt_p99_ms", "RTT p99 (ms)"),
        ("daemon_cpu_s_per_gb", "daemon CPU (s/GB)"),
        ("softirq_cpu_s_per_gb", "softirq CPU (s/GB)"),
    ]
    settings = list(report["settings"])
    columns = 3
    rows_per_setting = -(-len(panels) // columns)
    fig, axes = plt.subplots(
        rows_per_setting * len(settings),
        columns,
        figsize=(4.2 * columns, 3.2 * rows_per_setting * len(settings)),
        squeeze=False,
    )
    for block, setting in enumerate(settings):
        backends = report["settings"][setting]["backends"]
        names = list(backends)
        for index, (key, title) in enumerate(panels):
            ax = axes[block * rows_per_setting + index // columns][index % columns]
            medians = [(backends[n][key] or {}).get("median", 0) for n in names]
            lows = [m - (backends[n][key] or {}).get("min", m) for n, m in zip(names, medians, strict=True)]
            highs = [(backends[n][key] or {}).get("max", m) - m for n, m in zip(names, medians, strict=True)]
            colours = {
                "host-gw": "#777777",
                "vxlan": "#4477aa",
                "udp": "#cc6633",
                "upstream-udp": "#e8b894",
                "upstream-vxlan": "#a9bfd8",
                "wireguard": "#228833",
                "wireguard-go": "#99cc99",
                "boringtun": "#ccddaa",
            }
            ax.bar(names, medians, yerr=[lows, highs], color=[colours.get(n, "#999999") for n in names], capsize=3)
            ax.tick_params(axis="x", labelrotation=30)
            ax.set_title(f"{title}\nunderlay {setting}", fontsize=9)
            ax.tick_params(labelsize=8)
    fig.suptitle(
        f"flannel-udp backends, {report['machine']['date']}, {report['machine']['cores']} cores, "
        f"kernel {report['machine']['kernel']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def split_cpus(flags: list[str]) -> tuple[list[str], str | None]:
    """A variant's `cpus=LIST` (the daemons confined to those CPUs, as taskset -c) apart from its node flags."""
    cpus = next((flag.removeprefix("cpus=") for flag in flags if flag.startswith("cpus=")), None)
    return [flag for flag in flags if not flag.startswith("cpus=")], cpus


def check_backends(prog: str, backends: list[str], names: tuple[str, ...] = BACKENDS) -> None:
    """A mistyped backend, or a node flag a variant adds (`NAME@FLAG@FLAG`) that the node would refuse, ends the
    command in one line naming it, before any namespace is built."""
    from flannel_udp.cli import UsageError, parse_run_args

    for backend in backends:
        name, *flags = backend.split("@")
        if name not in names:
            raise SystemExit(f"{prog}: unknown backend {name!r} in {backend!r} (one of: {', '.join(names)})")
        try:
            flags, cpus = split_cpus(flags)
            if cpus is not None and not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", cpus):
                raise UsageError(f"cpus={cpus}: a CPU list as taskset takes it, e.g. 0 or 0-1")
            parse_run_args(flags, backend)
        except UsageError as e:
            raise SystemExit(f"{prog}: {backend!r}: {str(e).removeprefix(backend + ': ')}") from None


def parse_arguments(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The options, and the backends to measure (checked; upstream's left out where they cannot run)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description="Compare the backends side by side.")
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma list of: " + ", ".join(BACKENDS) + " (default: all; the upstream ones when built); "
        "NAME@FLAG@... runs ours with node flags, e.g. udp@-udp-priority=10",
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions per figure (median, min, max)")
    parser.add_argument("--seconds", type=float, default=5, help="iperf3 duration per TCP test")
    parser.add_argument("--underlay", choices=["defaults", "offloads-off", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="one short repetition, veth defaults only (< 60 s)")
    parser.add_argument(
        "--ipv6",
        action="store_true",
        help="dual-stack network; every figure between the pods' IPv6 "
        "addresses (upstream's udp backend is IPv4-only and is left out)",
    )
    parser.add_argument(
        "--ipv6-only",
        action="store_true",
        help="IPv6-only network on an IPv6-only underlay (upstream runs it with its Kubernetes subnet manager; its "
        "udp backend is IPv4-only and is left out)",
    )
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON (schema in docs/performance.md)")
    parser.add_argument("--plot", metavar="FILE.png", help="bar charts of the main figures")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends:
        raise SystemExit(f"{parser.prog}: no backend given")
    check_backends(parser.prog, backends)
    from testbed import upstreamflannel

    chosen = args.backends != parser.get_default("backends")
    if any(b.startswith(UPSTREAM) for b in backends) and not upstreamflannel.available():
        if chosen:
            parser.error(f"upstream flanneld is not built ({upstreamflannel.flanneld_path()}): run scripts/setup.sh")
        backends = [b for b in backends if not b.startswith(UPSTREAM)]
    from testbed import wgpeers

    for name in WIREGUARD_PROGRAMS:
        if name in backends and not wgpeers.available(name):
            if chosen:
                parser.error(f"{name} is not built ({wgpeers.PROGRAMS[name]}): run scripts/setup.sh")
            backends.remove(name)
    if (args.ipv6 or args.ipv6_only) and any(b in WIREGUARD_PROGRAMS for b in backends):
        if chosen:
            parser.error("the wireguard-go and boringtun rows are IPv4 networks only (configured so by the harness)")
        backends = [b for b in backends if b not in WIREGUARD_PROGRAMS]
    if (args.ipv6 or args.ipv6_only) and "upstream-udp" in backends:
        if chosen:
            parser.error(f"{'--ipv6-only' if args.ipv6_only else '--ipv6'}: upstream's udp backend is IPv4-only")
        backends.remove("upstream-udp")
    if args.quick:
        args.repeat, args.seconds, args.underlay = 1, 1, "defaults"
    return args, backends


def machine_facts() -> dict:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "kernel": platform.release(),
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "tools": tool_versions(),
    }


def measure_all(args: argparse.Namespace, backends: list[str], settings: list[str]) -> dict:
    """Every backend in every underlay setting, --repeat times, backends interleaved within each repetition."""
    ping_count = 100 if args.quick else 500
    runs: dict = {s: {b: [] for b in backends} for s in settings}
    for setting in settings:
        for repetition in range(args.repeat):
            for backend in backends:
                progress(f"underlay {setting}, repetition {repetition + 1}/{args.repeat}: {backend}")
                runs[setting][backend].append(
                    measure(backend, setting == "defaults", args.seconds, ping_count, args.ipv6, args.ipv6_only)
                )
    return runs


def build_report(machine: dict, args: argparse.Namespace, backends: list[str], runs: dict) -> dict:
    """The JSON report (schema in docs/performance.md); prints each setting's table on the way."""
    report = {
        "machine": machine,
        "parameters": {
            "repeat": args.repeat,
            "seconds": args.seconds,
            "backends": backends,
            "ipv6": args.ipv6,
            "ipv6_only": args.ipv6_only,
        },
        "settings": {},
    }
    for setting, setting_runs in runs.items():
        summary = {b: summarise(setting_runs[b]) for b in backends}
        report["settings"][setting] = {"backends": summary, "runs": setting_runs}
        print(table(setting, summary, backends))
    report["backends"] = next(iter(report["settings"].values()))["backends"]  # the first setting, for quick lookups
    return report


def family_note(args: argparse.Namespace) -> str:
    if args.ipv6_only:
        return "; IPv6-only network and underlay"
    return "; IPv6 pods" if args.ipv6 else ""


def main(argv: list[str] | None = None) -> int:
    args, backends = parse_arguments(argv)
    settings = ["defaults", "offloads-off"] if args.underlay == "both" else [args.underlay]
    # SIGTERM takes the same clean path as Ctrl-C: every testbed is closed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    machine = machine_facts()
    print(
        f"# {machine['date']}, kernel {machine['kernel']}, {machine['cores']} cores; backends {', '.join(backends)}; "
        f"{args.repeat} x {args.seconds:g}s per TCP test{family_note(args)}",
        flush=True,
    )
    started = time.monotonic()
    try:
        runs = measure_all(args, backends, settings)
    except KeyboardInterrupt:
        print("\ninterrupted; everything built was removed", file=sys.stderr)
        return 130
    report = build_report(machine, args, backends, runs)
    print(f"\n(took {time.monotonic() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        plot(args.plot, report)
    return 0
