"""The user tools behind `flannel-udp config` and `flannel-udp leases`, taking plain values (paths, store options, a
LeaseSource): the command line only reads argv and env and calls them. Errors are ToolError, one line each."""

from __future__ import annotations

import asyncio
import ipaddress
import time

from .subnet.config import ConfigError, NetworkConfig, load_config
from .subnet.etcd.client import EtcdConfigError, EtcdOptions
from .subnet.registry import StoreError
from .subnet.source import LeaseSource


class ToolError(Exception):
    pass


def read_config(path: str) -> tuple[bytes, NetworkConfig]:
    try:
        with open(path, "rb") as f:
            text = f.read()
        return text, load_config(text)
    except OSError as e:
        raise ToolError(f"cannot read {path}: {e.strerror}") from None
    except ConfigError as e:
        raise ToolError(f"{path}: {e}") from None


def show_config(path: str) -> None:
    """A checked net-conf.json, with what upstream derives from it (SubnetLen, SubnetMin/Max, subnet count)."""
    _, cfg = read_config(path)
    rows: list[tuple[str, object]] = []
    if cfg.enable_ipv4:
        rows += [
            ("Network", cfg.network),
            ("SubnetLen", cfg.subnet_len),
            ("SubnetMin", cfg.subnet_min),
            ("SubnetMax", cfg.subnet_max),
            ("Subnets", cfg.subnet_count()),
        ]
    if cfg.enable_ipv6:
        rows += [
            ("IPv6Network", cfg.ipv6_network),
            ("IPv6SubnetLen", cfg.ipv6_subnet_len),
            ("IPv6SubnetMin", cfg.ipv6_subnet_min),
            ("IPv6SubnetMax", cfg.ipv6_subnet_max),
            ("IPv6Subnets", cfg.ipv6_subnet_count()),
        ]
    rows.append(("Backend", cfg.backend_name))
    for name, value in rows:
        print(f"{name + ':':15}{value}")


def put_config(path: str, etcd: EtcdOptions) -> None:
    """Store a checked net-conf.json as <prefix>/config, where every etcd-mode node reads it."""
    from .subnet.etcd.registry import EtcdRegistry

    text, cfg = read_config(path)
    if not cfg.enable_ipv4:
        raise ToolError(
            f"{path}: IPv6-only networks are not supported with etcd (EnableIPv4 false): upstream's subnet keys "
            "always carry an IPv4 subnet"
        )

    async def work() -> None:
        registry = EtcdRegistry(etcd)
        try:
            await registry.put_network_config(text)
        finally:
            await registry.close()
        print(f"stored {path} as {registry.config_key}")

    try:
        asyncio.run(work())
    except (StoreError, EtcdConfigError) as e:
        raise ToolError(str(e)) from None


def list_leases(source: LeaseSource) -> None:
    try:
        rows = asyncio.run(source.read())
    except (StoreError, EtcdConfigError) as e:
        raise ToolError(str(e)) from None
    print_leases(rows, with_node=source.kube is not None)


def delete_lease(source: LeaseSource, subnet: str) -> None:
    """Delete the lease that holds `subnet` (its IPv4 or IPv6 subnet, also in FLANNEL_SUBNET's form 10.244.6.1/24)."""
    if source.kube is not None:
        raise ToolError("in kube mode a lease is the Node's podCIDR: delete the Node object instead")
    try:
        wanted = ipaddress.ip_network(subnet, strict=False)
    except ValueError:
        raise ToolError(f"not a subnet: {subnet}") from None

    async def work() -> None:
        registry = source.open_registry()
        try:
            leases, _ = await registry.get_subnets()
            # Either subnet names a lease (an IPv6-only lease has only the IPv6 one).
            match = next((lease for lease in leases if wanted in (lease.subnet, lease.ipv6_subnet)), None)
            if match is None:
                raise ToolError(f"no lease for subnet {subnet}")
            await registry.delete_subnet(match.subnet, match.ipv6_subnet)
            print(f"deleted lease {subnet}")
        finally:
            await registry.close()

    try:
        asyncio.run(work())
    except (StoreError, EtcdConfigError) as e:
        raise ToolError(str(e)) from None


def print_leases(rows: list, with_node: bool) -> None:
    """One line per lease: [node,] [subnet, public IP,] [IPv6 subnet and public IPv6,] backend, time left; the
    columns of a family no lease has are left out (an IPv6-only network has no IPv4 ones)."""
    now = time.time()
    has4 = not rows or any(lease.subnet is not None for _node, lease in rows)
    has6 = any(lease.ipv6_subnet is not None for _node, lease in rows)
    node_header = f"{'NODE':24} " if with_node else ""
    v4_header = f"{'SUBNET':20} {'PUBLIC IP':16} " if has4 else ""
    v6_header = f"{'IPV6 SUBNET':24} {'PUBLIC IPV6':24} " if has6 else ""
    print(f"{node_header}{v4_header}{v6_header}{'BACKEND':9} EXPIRES IN")
    for node, lease in rows:
        left = lease.seconds_left(now)
        if left is None:
            expires = "never (podCIDR)" if with_node else "never (reservation)"
        else:
            expires = f"{int(left // 3600)}h{int(left % 3600 // 60):02d}m{int(left % 60):02d}s"
        public_ip = str(lease.attrs.public_ip) if lease.subnet is not None else "-"
        v4 = f"{str(lease.subnet or '-'):20} {public_ip:16} " if has4 else ""
        v6 = f"{str(lease.ipv6_subnet or '-'):24} {str(lease.attrs.public_ipv6 or '-'):24} " if has6 else ""
        name = f"{node:24} " if with_node else ""
        print(f"{name}{v4}{v6}{lease.attrs.backend_type or 'udp':9} {expires}")
