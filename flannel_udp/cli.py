"""The only place that reads argv and the environment.

`flannel-udp run` (and `flanneld`) take flanneld's flag names in Go's syntax (-name value, -name=value, --name, and
-bool=false) plus FLANNELD_* variables for flags not given on the command line. Unlike upstream, an unknown flag is an
error (exit 1), not a silent exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import NoReturn

from . import __version__, defaults
from .gostrconv import parse_bool

log = logging.getLogger("flannel_udp")


class UsageError(Exception):
    pass


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line and exit 1, as every user error here
        raise UsageError(f"{self.prog}: {message}")


# flanneld's flags (upstream main.go) and ours: name -> (kind, default, help). kind: str | int | bool | list.
RUN_FLAGS: dict[str, tuple[str, object, str]] = {
    "net-config-path": ("str", defaults.NET_CONFIG_PATH, "path to the network configuration (net-conf.json)"),
    "subnet-file": ("str", defaults.SUBNET_FILE, "file the CNI plugin reads the subnet from"),
    "iface": ("list", None, "interface (name or IP) for inter-host traffic; repeatable, first match wins"),
    "iface-regex": ("list", None, "regex on interface addresses, then names; repeatable"),
    "iface-can-reach": ("str", "", "use the interface that routes to this IP"),
    "public-ip": ("str", "", "IP other nodes send to (default: the interface address)"),
    "public-ipv6": (
        "str",
        "",
        "IPv6 address other nodes send IPv6 pod traffic to (dual stack; default: the interface's)",
    ),
    "subnet-lease-renew-margin": ("int", 60, "minutes before expiry to renew the lease (1..1439)"),
    "ip-masq": ("bool", False, "set up masquerade rules for traffic leaving the overlay"),
    "ip-masq-fully-random-disable": ("bool", False, "do not use --random-fully in masquerade rules"),
    "iptables-resync": ("int", 5, "seconds between iptables rule checks"),
    "iptables-forward-rules": ("bool", True, "add FORWARD accept rules for the overlay"),
    "ip-blackhole-route": ("bool", False, "add a blackhole route for the own subnet"),
    "healthz-ip": ("str", "0.0.0.0", "address for /healthz, /readyz and /metrics"),
    "healthz-port": ("int", 0, "port for /healthz, /readyz and /metrics (0: off)"),
    "etcd-endpoints": ("str", "", "comma-separated etcd endpoints (selects etcd instead of the embedded store)"),
    "etcd-prefix": ("str", "/coreos.com/network", "etcd key prefix"),
    "etcd-keyfile": ("str", "", "etcd TLS key"),
    "etcd-certfile": ("str", "", "etcd TLS certificate"),
    "etcd-cafile": ("str", "", "etcd TLS CA"),
    "etcd-username": ("str", "", "etcd user"),
    "etcd-password": ("str", "", "etcd password"),
    "kube-subnet-mgr": ("bool", False, "take the subnet from the node's podCIDR and the peers from the Node objects"),
    "kube-api-url": ("str", "", "Kubernetes API server URL (not needed in a pod)"),
    "kubeconfig-file": ("str", "", "kubeconfig file (not needed in a pod)"),
    "kube-annotation-prefix": ("str", "flannel.alpha.coreos.com", "prefix of the node annotations"),
    "set-node-network-unavailable": ("bool", True, "set the node's NetworkUnavailable condition to False once up"),
    "v": ("int", 0, "log verbosity (>= 1: debug)"),
    # flannel-udp's own
    "lease-file": ("str", defaults.LEASE_FILE, "embedded lease store shared by the nodes of this machine"),
    "lease-ttl": (
        "int",
        defaults.LEASE_TTL,
        "seconds a lease lives without renewal (embedded store and etcd; upstream: 24 h)",
    ),
    "udp-source-check": (
        "bool",
        True,
        "accept a datagram only from a lease's PublicIP with an inner source in its subnet (turn off behind NAT)",
    ),
    "udp-offload": ("bool", True, "batch datagrams with UDP GSO/GRO (false: one datagram per syscall message)"),
    "udp-priority": ("int", 0, "real-time (SCHED_FIFO) priority 1..99 of the packet thread; 0: ordinary scheduling"),
    "udp-busy-poll": (
        "int",
        0,
        "microseconds (0..1000) the packet thread keeps looking for packets after a burst before it sleeps; 0: none",
    ),
    "udp-workers": (
        "int",
        0,
        "packet threads of the udp backend (1..256), each with its own queue of flannel0 and UDP socket, every flow "
        "kept on one; the wireguard backend's per device likewise; 0: one per CPU this process may run on, up to 16",
    ),
    "cni-bridge-repair": (
        "bool",
        True,
        "rebuild the pods' bridge (cni0) when it is deleted or loses its address or "
        "MTU, and re-attach the veths the flannel CNI plugin attached",
    ),
    "cni-data-dir": (
        "str",
        defaults.CNI_DATA_DIR,
        "dataDir of the flannel CNI plugin's config (its port records are in <dataDir>-ports)",
    ),
}


ETCD_FLAGS = [name for name in RUN_FLAGS if name.startswith("etcd-")]


def normalise_go_flags(argv: list[str], names: set[str]) -> tuple[list[str], set[str]]:
    """Go flag syntax -> argparse syntax; also returns the flags given, so that env vars do not override them."""
    out, given = [], set()
    for arg in argv:
        m = re.fullmatch(r"--?([A-Za-z][\w-]*)(=(.*))?", arg, re.S)
        if m is None or m.group(1) not in names:
            out.append(arg)
            continue
        name, value = m.group(1), m.group(3)
        given.add(name)
        if RUN_FLAGS[name][0] == "bool":
            try:
                out.append(f"--{name}" if value is None or parse_bool(value) else f"--no-{name}")
            except ValueError:
                raise UsageError(f"invalid boolean value {value!r} for -{name}") from None
        else:
            out.append(f"--{name}" if value is None else f"--{name}={value}")
    return out, given


def build_run_parser(prog: str) -> OneLineParser:
    parser = OneLineParser(prog=prog, description="Run the flannel node agent (flanneld-compatible flags).")
    for name, (kind, default, help_text) in RUN_FLAGS.items():
        dest = name.replace("-", "_")
        if kind == "bool":
            parser.add_argument(
                f"--{name}", dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif kind == "list":
            parser.add_argument(f"--{name}", dest=dest, action="append", default=[], help=help_text)
        else:
            parser.add_argument(
                f"--{name}", dest=dest, type=int if kind == "int" else str, default=default, help=help_text
            )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    return parser


def apply_env(args: argparse.Namespace, given: set[str]) -> None:
    """FLANNELD_<FLAG> fills a flag that the command line did not set (a bad value is logged and skipped)."""
    for name, (kind, _default, _help) in RUN_FLAGS.items():
        value = os.environ.get("FLANNELD_" + name.upper().replace("-", "_"), "")
        if name in given or not value:
            continue
        dest = name.replace("-", "_")
        try:
            if kind == "bool":
                setattr(args, dest, parse_bool(value))
            elif kind == "int":
                setattr(args, dest, int(value))
            elif kind == "list":
                setattr(args, dest, [value])  # upstream does not split on commas
            else:
                setattr(args, dest, value)
        except ValueError:
            log.error(
                "Failed to set flag FLANNELD_%s from env: invalid value %r", name.upper().replace("-", "_"), value
            )


def setup_logging(verbosity: int) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbosity >= 1 else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
    )
    # The HTTP client logs every request at INFO: a watch would log each reconnection attempt.
    logging.getLogger("httpx2").setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def parse_run_args(argv: list[str], prog: str) -> argparse.Namespace:
    """The node's flags from argv and FLANNELD_*, checked; UsageError names the first bad flag or value."""
    normalised, given = normalise_go_flags(argv, set(RUN_FLAGS))
    args = build_run_parser(prog).parse_args(["--help" if a == "-h" else a for a in normalised])
    apply_env(args, given)
    if not 0 < args.subnet_lease_renew_margin < 1440:
        raise UsageError("-subnet-lease-renew-margin must be between 1 and 1439 minutes")
    for flag, value, low, high in (
        ("-healthz-port", args.healthz_port, 0, 65535),
        ("-iptables-resync", args.iptables_resync, 1, 86400),
        ("-v", args.v, 0, 10),
        ("-udp-priority", args.udp_priority, 0, 99),
        ("-udp-busy-poll", args.udp_busy_poll, 0, 1000),
        ("-udp-workers", args.udp_workers, 0, 256),
    ):
        if not low <= value <= high:
            raise UsageError(f"{flag} must be from {low} to {high}, got {value}")
    if args.lease_ttl <= 0:
        raise UsageError("--lease-ttl must be a positive number of seconds")
    return args


def run_command(argv: list[str], prog: str) -> int:
    if any(a in ("-version", "--version") for a in argv):
        print(__version__, file=sys.stderr)  # to stderr, as upstream
        return 0
    args = parse_run_args(argv, prog)
    setup_logging(args.v)

    import uvloop

    from .daemon import Daemon, Options, StartupError

    opts = Options(
        net_config_path=args.net_config_path,
        subnet_file=args.subnet_file,
        lease_file=args.lease_file,
        lease_ttl=float(args.lease_ttl),
        iface=args.iface,
        iface_regex=args.iface_regex,
        iface_can_reach=args.iface_can_reach,
        public_ip=args.public_ip,
        public_ipv6=args.public_ipv6,
        subnet_lease_renew_margin=args.subnet_lease_renew_margin,
        ip_masq=args.ip_masq,
        healthz_ip=args.healthz_ip,
        healthz_port=args.healthz_port,
        udp_source_check=args.udp_source_check,
        udp_offload=args.udp_offload,
        udp_priority=args.udp_priority,
        udp_busy_poll=args.udp_busy_poll,
        udp_workers=args.udp_workers,
        etcd=None if args.kube_subnet_mgr else etcd_options(args),
        kube=kube_options(args),
        ip_masq_fully_random_disable=args.ip_masq_fully_random_disable,
        iptables_forward_rules=args.iptables_forward_rules,
        iptables_resync=args.iptables_resync,
        ip_blackhole_route=args.ip_blackhole_route,
        cni_bridge_repair=args.cni_bridge_repair,
        cni_data_dir=args.cni_data_dir,
    )
    try:
        return uvloop.run(Daemon(opts).run())
    except StartupError as e:
        return fail(str(e))


def etcd_options(args: argparse.Namespace):
    """Giving -etcd-endpoints (or FLANNELD_ETCD_ENDPOINTS) selects etcd; otherwise the embedded store is used."""
    if not args.etcd_endpoints:
        return None
    from .subnet.etcd.client import EtcdOptions

    return EtcdOptions(
        endpoints=args.etcd_endpoints,
        prefix=args.etcd_prefix,
        keyfile=args.etcd_keyfile,
        certfile=args.etcd_certfile,
        cafile=args.etcd_cafile,
        username=args.etcd_username,
        password=args.etcd_password,
    )


def kube_options(args: argparse.Namespace):
    """-kube-subnet-mgr selects the Kubernetes API (the etcd flags are then ignored, as upstream)."""
    if not args.kube_subnet_mgr:
        return None
    from .subnet.kube.client import KubeOptions

    return KubeOptions(
        api_url=args.kube_api_url,
        kubeconfig_file=args.kubeconfig_file,
        annotation_prefix=args.kube_annotation_prefix,
        set_node_network_unavailable=getattr(args, "set_node_network_unavailable", True),
    )


def lease_source(args: argparse.Namespace):
    """The store the user tools read leases from, from the store flags."""
    from .subnet.source import LeaseSource

    return LeaseSource(args.lease_file, etcd_options(args), kube_options(args))


def add_etcd_arguments(parser: argparse.ArgumentParser) -> None:
    for name in ETCD_FLAGS:
        kind, default, help_text = RUN_FLAGS[name]
        parser.add_argument(f"--{name}", f"-{name}", dest=name.replace("-", "_"), default=default, help=help_text)


KUBE_FLAGS = ["kube-subnet-mgr", "kube-api-url", "kubeconfig-file", "kube-annotation-prefix"]


def add_kube_arguments(parser: argparse.ArgumentParser) -> None:
    for name in KUBE_FLAGS:
        kind, default, help_text = RUN_FLAGS[name]
        dest = name.replace("-", "_")
        if kind == "bool":
            parser.add_argument(f"--{name}", f"-{name}", dest=dest, action="store_true", help=help_text)
        else:
            parser.add_argument(f"--{name}", f"-{name}", dest=dest, default=default, help=help_text)


def config_command(args: argparse.Namespace) -> int:
    from .tools import ToolError, put_config, show_config

    try:
        if args.config_command == "put":
            etcd = etcd_options(args)
            if etcd is None:
                return fail("config put: give -etcd-endpoints")
            put_config(args.path, etcd)
        else:
            show_config(args.path)
        return 0
    except ToolError as e:
        return fail(str(e))


def leases_command(args: argparse.Namespace) -> int:
    from .tools import ToolError, delete_lease, list_leases

    try:
        if args.action == "delete":
            delete_lease(lease_source(args), args.subnet)
        else:
            list_leases(lease_source(args))
        return 0
    except ToolError as e:
        return fail(str(e))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "run":
            return run_command(argv[1:], "flannel-udp run")
        parser = OneLineParser(prog="flannel-udp", description="flanneld with a fast userspace UDP data plane.")
        sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        sub.add_parser("run", help="run the node agent (flanneld flags; see 'flannel-udp run -h')")
        config = sub.add_parser("config", help="network configuration tools")
        config_sub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
        check = config_sub.add_parser("check", help="validate a net-conf.json and print the derived values")
        check.add_argument("path")
        put = config_sub.add_parser("put", help="check a net-conf.json, then store it in etcd as <prefix>/config")
        put.add_argument("path")
        add_etcd_arguments(put)
        leases = sub.add_parser(
            "leases", help="list (or delete) the leases in the embedded store, etcd or the Kubernetes API"
        )
        leases.add_argument("action", nargs="?", choices=["list", "delete"], default="list")
        leases.add_argument("subnet", nargs="?", help="with delete: the subnet, e.g. 10.244.1.0/24")
        leases.add_argument("--lease-file", default=defaults.LEASE_FILE)
        add_etcd_arguments(leases)
        add_kube_arguments(leases)
        demo = sub.add_parser("demo", help="build a cluster in network namespaces on this machine and show it working")
        from .demo import add_arguments

        add_arguments(demo)
        capture = sub.add_parser(
            "capture", help="decode overlay traffic on the underlay, flannel0 or a pcap, with the data plane's verdicts"
        )
        from .capture import add_arguments as add_capture_arguments

        add_capture_arguments(capture)
        add_etcd_arguments(capture)
        add_kube_arguments(capture)
        clean = sub.add_parser("cleanup", help="remove what a node set up in this network namespace (run it stopped)")
        clean.add_argument(
            "--subnet-file",
            "-subnet-file",
            default=defaults.SUBNET_FILE,
            help="where the node's subnet (for its blackhole route) is read",
        )
        sub.add_parser("version", help="print the version")
        args = parser.parse_args(argv)
        if args.command == "config":
            return config_command(args)
        if args.command == "leases":
            if args.action == "delete" and not args.subnet:
                raise UsageError("flannel-udp leases delete: give the subnet to delete")
            return leases_command(args)
        if args.command == "cleanup":
            from .cleanup import run_cleanup

            return run_cleanup(args.subnet_file)
        if args.command == "capture":
            from .capture import CaptureError, run_capture

            try:
                return run_capture(args, lease_source(args))
            except CaptureError as e:
                return fail(str(e))
        if args.command == "demo":
            from .demo import run

            return run(args)
        print(__version__)
        return 0
    except UsageError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return 130


def flanneld_main() -> int:
    try:
        return run_command(sys.argv[1:], "flanneld")
    except UsageError as e:
        return fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
