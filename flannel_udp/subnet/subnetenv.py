"""/run/flannel/subnet.env: written atomically for the CNI plugin, read back at start-up (upstream WriteSubnetFile)."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import tempfile

from .config import NetworkConfig
from .lease import Lease

log = logging.getLogger(__name__)


def gateway(subnet: ipaddress.IPv4Network | ipaddress.IPv6Network) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """The subnet's first address with its prefix length: FLANNEL_SUBNET, and the pods' bridge address (isGateway)."""
    return ipaddress.ip_interface(f"{subnet.network_address + 1}/{subnet.prefixlen}")


def render(cfg: NetworkConfig, lease: Lease, mtu: int, ip_masq: bool) -> str:
    lines = []
    if cfg.enable_ipv4:
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


def read(path: str) -> dict[str, list]:
    """Each FLANNEL_* value as a list of the comma-separated entries that parse as CIDRs; {} if the file is absent."""
    try:
        with open(path) as f:
            text = f.read()
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
