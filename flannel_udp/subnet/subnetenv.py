"""/run/flannel/subnet.env: written atomically for the CNI plugin (upstream WriteSubnetFile), and every reading of it,
as upstream has two: the CNI plugin's, strict (load: the cni-plugin's loadFlannelSubnetEnv), and the node agent's at
start-up, a hint that skips what it cannot read (read: pkg/subnet ReadCIDRsFromSubnetFile, with single()).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import tempfile
from dataclasses import dataclass

from .config import NetworkConfig
from .lease import Lease

log = logging.getLogger(__name__)


def gateway(subnet: ipaddress.IPv4Network | ipaddress.IPv6Network) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """The subnet's first address with its prefix length: FLANNEL_SUBNET, and the pods' bridge address (isGateway)."""
    return ipaddress.ip_interface(f"{subnet.network_address + 1}/{subnet.prefixlen}")


def render(cfg: NetworkConfig, lease: Lease, mtu: int, ip_masq: bool) -> str:
    lines = []
    if cfg.enable_ipv4 and lease.subnet is not None:
        lines.append(f"FLANNEL_NETWORK={cfg.network}")
        lines.append(f"FLANNEL_SUBNET={gateway(lease.subnet)}")
    if cfg.enable_ipv6 and lease.ipv6_subnet is not None:
        lines.append(f"FLANNEL_IPV6_NETWORK={cfg.ipv6_network}")
        lines.append(f"FLANNEL_IPV6_SUBNET={gateway(lease.ipv6_subnet)}")
    lines.append(f"FLANNEL_MTU={mtu}")
    lines.append(f"FLANNEL_IPMASQ={'true' if ip_masq else 'false'}")
    return "".join(line + "\n" for line in lines)


def write_atomically(path: str, data: str, mode: int = 0o644) -> None:
    """Temp file in the same directory, fsync, rename: a reader sees the old file or the new one, never a torn one."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except FileExistsError:  # a file where the directory should be: say so, not "File exists"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory) from None
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".subnet.env.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)  # exactly 0644 whatever the umask, as upstream
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode()


def read(path: str) -> dict[str, list]:
    """Each FLANNEL_* value as a list of the comma-separated entries that parse as CIDRs; {} if the file is absent.
    The agent's reading: `export`, quotes and comments allowed (upstream reads it with godotenv)."""
    try:
        text = _text(path)
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        # Only a hint for choosing the subnet: an unreadable file is started without (writing it later says why).
        log.warning(
            "Cannot read the previous subnet file %s (%s); choosing a subnet without it",
            path,
            e.strerror if isinstance(e, OSError) else "not UTF-8 text",
        )
        return {}
    values: dict[str, list] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        name = name.strip().removeprefix("export ").strip()
        value = value.strip().strip('"').strip("'")
        if name in ("FLANNEL_SUBNET", "FLANNEL_NETWORK", "FLANNEL_IPV6_SUBNET", "FLANNEL_IPV6_NETWORK"):
            entries = []
            for entry in value.split(","):
                try:
                    entries.append(ipaddress.ip_network(entry.strip(), strict=False))
                except ValueError:
                    continue
            values[name] = entries
        else:
            values[name] = [value]
    return values


def single(values: dict[str, list], name: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """The one network a value of read() names, masked to it; None for none or several (said, as upstream)."""
    entries = values.get(name, [])
    if len(entries) > 1:
        log.error("%s in the subnet file has more than one valid value, ignoring it", name)
    return entries[0] if len(entries) == 1 else None


class SubnetEnvError(ValueError):
    """A value the CNI plugin cannot use, in upstream's words (one line)."""


@dataclass(frozen=True)
class SubnetEnv:
    """subnet.env as the CNI plugin takes it."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # FLANNEL_NETWORK: one or more
    subnet: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None = None
    ipv6_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    ipv6_subnet: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None = None
    mtu: int | None = None
    ipmasq: bool | None = None

    def missing(self) -> list[str]:
        """What the plugin needs and the file lacks, as upstream's plugin says it: a network and a subnet of either
        family (an IPv6-only node writes only the IPv6 pair), the MTU and IPMASQ; and here also the network of each
        subnet given (an IPv6 subnet without FLANNEL_IPV6_NETWORK would give pods no route to the other nodes)."""
        out = []
        if not self.networks and not self.ipv6_networks:
            out += ["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]
        if self.subnet is None and self.ipv6_subnet is None:
            out += ["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]
        out += [name for name, value in (("FLANNEL_MTU", self.mtu), ("FLANNEL_IPMASQ", self.ipmasq)) if value is None]
        for name, subnet, networks in (
            ("FLANNEL_NETWORK", self.subnet, self.networks),
            ("FLANNEL_IPV6_NETWORK", self.ipv6_subnet, self.ipv6_networks),
        ):
            if subnet is not None and not networks and name not in out:
                out.append(name)
        return out


def _cidr(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """Go's net.ParseCIDR: an address and a prefix length, nothing around them."""
    try:
        if "/" not in text:
            raise ValueError(text)
        return ipaddress.ip_interface(text)
    except ValueError:
        raise SubnetEnvError(f"invalid CIDR address: {text}") from None


def _networks(text: str) -> tuple:
    networks: list = []
    for entry in text.split(","):
        network = _cidr(entry).network
        if network not in networks:
            networks.append(network)
    return tuple(networks)


def parse(text: str) -> SubnetEnv:
    """upstream loadFlannelSubnetEnv: `NAME=value` lines, the names exactly; a network may be a comma list, the MTU an
    unsigned 32-bit decimal, IP masquerade on only for `true`; other lines are ignored, a bad value is an error."""
    fields: dict = {}
    for line in text.splitlines():
        name, _, value = line.partition("=")
        if name in ("FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"):
            fields["networks" if name == "FLANNEL_NETWORK" else "ipv6_networks"] = _networks(value)
        elif name in ("FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"):
            fields["subnet" if name == "FLANNEL_SUBNET" else "ipv6_subnet"] = _cidr(value)
        elif name == "FLANNEL_MTU":
            if not (value.isascii() and value.isdigit() and int(value) < 1 << 32):
                raise SubnetEnvError(f"invalid FLANNEL_MTU {value!r}")
            fields["mtu"] = int(value)
        elif name == "FLANNEL_IPMASQ":
            fields["ipmasq"] = value == "true"
    return SubnetEnv(**fields)


def load(path: str) -> SubnetEnv:
    """parse() of the file; OSError when it cannot be read (the node agent has not written it yet)."""
    try:
        return parse(_text(path))
    except UnicodeDecodeError:
        raise SubnetEnvError("not UTF-8 text") from None
