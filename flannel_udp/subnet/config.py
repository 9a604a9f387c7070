"""The network configuration (net-conf.json or etcd <prefix>/config), parsed and checked as upstream flanneld does.

Parsing follows Go encoding/json semantics (keys matched case-insensitively, the last duplicate wins, unknown keys
ignored, a wrong JSON type is an error). Checking derives SubnetLen/SubnetMin/SubnetMax and uses upstream's error texts
verbatim, because operators search for them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

IPv4Net = ipaddress.IPv4Network
IPv6Net = ipaddress.IPv6Network


class ConfigError(ValueError):
    """A network configuration that flanneld would refuse."""


@dataclass(frozen=True)
class NetworkConfig:
    network: IPv4Net | None = None
    subnet_len: int = 0
    subnet_min: ipaddress.IPv4Address | None = None
    subnet_max: ipaddress.IPv4Address | None = None
    enable_ipv4: bool = True
    enable_ipv6: bool = False
    ipv6_network: IPv6Net | None = None
    ipv6_subnet_len: int = 0
    ipv6_subnet_min: ipaddress.IPv6Address | None = None
    ipv6_subnet_max: ipaddress.IPv6Address | None = None
    enable_nftables: bool = False
    backend_type: str = "udp"
    backend: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def backend_name(self) -> str:
        """The registry name of the backend: upstream lower-cases the type only at lookup."""
        return self.backend_type.lower()

    def subnet_count(self) -> int:
        if self.subnet_min is None or self.subnet_max is None:
            return 0
        size = 1 << (32 - self.subnet_len)
        span = int(self.subnet_max) - int(self.subnet_min)
        return span // size + 1 if span >= 0 else 0

    def ipv6_subnet_count(self) -> int:
        if self.ipv6_subnet_min is None or self.ipv6_subnet_max is None:
            return 0
        size = 1 << (128 - self.ipv6_subnet_len)
        span = int(self.ipv6_subnet_max) - int(self.ipv6_subnet_min)
        return span // size + 1 if span >= 0 else 0


# JSON field name -> (dataclass field, decoder). The decoders reject what Go's decoder rejects.
def _decode_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: expected a JSON boolean, got {json.dumps(value)}")
    return value


def _decode_uint(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 0xFFFFFFFF:
        raise ConfigError(f"{name}: expected an unsigned integer, got {json.dumps(value)}")
    return value


def _decode_cidr4(name: str, value: Any) -> IPv4Net:
    if not isinstance(value, str):
        raise ConfigError(f"{name}: invalid CIDR address: {json.dumps(value)}")
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(f"{name}: invalid CIDR address: {value}") from None
    if net.version != 4:
        raise ConfigError(f"{name}: invalid IPv4 CIDR format")
    return net


def _decode_cidr6(name: str, value: Any) -> IPv6Net:
    if not isinstance(value, str):
        raise ConfigError(f"{name}: invalid CIDR address: {json.dumps(value)}")
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ConfigError(f"{name}: invalid CIDR address: {value}") from None
    if net.version != 6:
        # Upstream silently maps an IPv4 CIDR into the v6 space; that never yields a usable network, so refuse it.
        raise ConfigError(f"{name}: invalid IPv6 CIDR format")
    return net


def _decode_ip4(name: str, value: Any) -> ipaddress.IPv4Address | None:
    try:
        addr = ipaddress.IPv4Address(value) if isinstance(value, str) else None
    except ValueError:
        addr = None
    if addr is None:
        raise ConfigError(f"{name}: invalid IPv4 address format: {json.dumps(value)}")
    return None if addr == ipaddress.IPv4Address(0) else addr


def _decode_ip6(name: str, value: Any) -> ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.IPv6Address(value) if isinstance(value, str) else None
    except ValueError:
        addr = None
    if addr is None:
        raise ConfigError(f"{name}: invalid IP address format: {json.dumps(value)}")
    return None if addr == ipaddress.IPv6Address(0) else addr


_FIELDS = {
    "network": ("Network", "network", _decode_cidr4, True),
    "subnetlen": ("SubnetLen", "subnet_len", _decode_uint, False),
    "subnetmin": ("SubnetMin", "subnet_min", _decode_ip4, True),
    "subnetmax": ("SubnetMax", "subnet_max", _decode_ip4, True),
    "enableipv4": ("EnableIPv4", "enable_ipv4", _decode_bool, False),
    "enableipv6": ("EnableIPv6", "enable_ipv6", _decode_bool, False),
    "ipv6network": ("IPv6Network", "ipv6_network", _decode_cidr6, True),
    "ipv6subnetlen": ("IPv6SubnetLen", "ipv6_subnet_len", _decode_uint, False),
    "ipv6subnetmin": ("IPv6SubnetMin", "ipv6_subnet_min", _decode_ip6, True),
    "ipv6subnetmax": ("IPv6SubnetMax", "ipv6_subnet_max", _decode_ip6, True),
    "enablenftables": ("EnableNFTables", "enable_nftables", _decode_bool, False),
}


def lookup_key(obj: dict[str, Any], key: str, default: Any = None) -> Any:
    """Go-style case-insensitive lookup of one key in a decoded JSON object (the last matching key wins)."""
    found = default
    for k, v in obj.items():
        if k.lower() == key.lower():
            found = v
    return found


def _pairs_to_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Keeps every spelling of a key so that case-insensitive matching sees them in document order.
    out: dict[str, Any] = {}
    for k, v in pairs:
        out.pop(k, None)
        out[k] = v
    return out


def parse_config(text: str | bytes) -> NetworkConfig:
    """Parse without deriving defaults (upstream ParseConfig)."""
    try:
        doc = json.loads(text, object_pairs_hook=_pairs_to_dict)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"invalid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError("the network config must be a JSON object")

    values: dict[str, Any] = {}
    backend_raw: Any = ...  # Ellipsis = absent, which selects udp; null selects ""
    for key, value in doc.items():
        folded = key.lower()
        if folded == "backend":
            backend_raw = value
            continue
        field = _FIELDS.get(folded)
        if field is None:
            continue
        json_name, attr, decode, null_is_error = field
        if value is None and not null_is_error:
            continue  # Go leaves the zero value in place for null
        values[attr] = decode(json_name, value)

    backend_type, backend = _parse_backend(backend_raw)
    return NetworkConfig(**values, backend_type=backend_type, backend=backend)


def _parse_backend(raw: Any) -> tuple[str, dict[str, Any]]:
    if raw is ...:
        return "udp", {}
    if raw is None:
        return "", {}
    if not isinstance(raw, dict):
        raise ConfigError(f"error decoding Backend property of config: expected a JSON object, got {json.dumps(raw)}")
    backend_type = lookup_key(raw, "Type", "")
    if backend_type is None:
        backend_type = ""
    if not isinstance(backend_type, str):
        raise ConfigError(
            f"error decoding Backend property of config: Type must be a string, got {json.dumps(backend_type)}"
        )
    return backend_type, raw


def check_config(cfg: NetworkConfig) -> NetworkConfig:
    """Validate and derive defaults (upstream CheckNetworkConfig); returns the completed config."""
    if cfg.enable_ipv4:
        cfg = _check_v4(cfg)
    if cfg.enable_ipv6:
        cfg = _check_v6(cfg)
    return cfg


def _check_v4(cfg: NetworkConfig) -> NetworkConfig:
    net = cfg.network
    if net is None or (int(net.network_address) == 0 and net.prefixlen == 0):
        raise ConfigError("please define a correct Network parameter in the flannel config")
    subnet_len = cfg.subnet_len
    if subnet_len > 0:
        if subnet_len > 30:
            raise ConfigError("SubnetLen must be less than /31")
        if subnet_len < net.prefixlen + 2:
            raise ConfigError("network must be able to accommodate at least four subnets")
    else:
        if net.prefixlen > 28:
            raise ConfigError("network is too small. Minimum useful network prefix is /28")
        subnet_len = 24 if net.prefixlen <= 22 else net.prefixlen + 2

    size = 1 << (32 - subnet_len)
    base = int(net.network_address)
    subnet_min = cfg.subnet_min
    if subnet_min is None:
        subnet_min = ipaddress.IPv4Address(base + size)  # the first subnet is skipped on purpose, as upstream
    elif subnet_min not in net:
        raise ConfigError("SubnetMin is not in the range of the Network")
    subnet_max = cfg.subnet_max
    if subnet_max is None:
        subnet_max = ipaddress.IPv4Address((base + (1 << (32 - net.prefixlen)) - size) % (1 << 32))
    elif subnet_max not in net:
        raise ConfigError("SubnetMax is not in the range of the Network")

    mask = ((1 << 32) - 1) ^ (size - 1)
    if int(subnet_min) & mask != int(subnet_min):
        raise ConfigError(f"SubnetMin is not on a SubnetLen boundary: {subnet_min}")
    if int(subnet_max) & mask != int(subnet_max):
        raise ConfigError(f"SubnetMax is not on a SubnetLen boundary: {subnet_max}")
    return dataclasses.replace(cfg, subnet_len=subnet_len, subnet_min=subnet_min, subnet_max=subnet_max)


def _check_v6(cfg: NetworkConfig) -> NetworkConfig:
    net = cfg.ipv6_network
    if net is None or (int(net.network_address) == 0 and net.prefixlen == 0):
        raise ConfigError("please define a correct IPv6Network parameter in the flannel config")
    subnet_len = cfg.ipv6_subnet_len
    if subnet_len > 0:
        if subnet_len > 126:
            raise ConfigError("SubnetLen must be less than /127")
        if subnet_len < net.prefixlen + 2:
            raise ConfigError("network must be able to accommodate at least four subnets")
    else:
        if net.prefixlen > 124:
            raise ConfigError("IPv6Network is too small. Minimum useful network prefix is /124")
        subnet_len = 64 if net.prefixlen <= 62 else net.prefixlen + 2

    size = 1 << (128 - subnet_len)
    base = int(net.network_address)
    subnet_min = cfg.ipv6_subnet_min
    if subnet_min is None:
        subnet_min = ipaddress.IPv6Address(base + size)
    elif subnet_min not in net:
        raise ConfigError("IPv6SubnetMin is not in the range of the IPv6Network")
    subnet_max = cfg.ipv6_subnet_max
    if subnet_max is None:
        subnet_max = ipaddress.IPv6Address((base + (1 << (128 - net.prefixlen)) - size) % (1 << 128))
    elif subnet_max not in net:
        raise ConfigError("IPv6SubnetMax is not in the range of the IPv6Network")

    mask = ((1 << 128) - 1) ^ (size - 1)
    if int(subnet_min) & mask != int(subnet_min):
        raise ConfigError(f"IPv6SubnetMin is not on a SubnetLen boundary: {subnet_min}")
    if int(subnet_max) & mask != int(subnet_max):
        raise ConfigError(f"IPv6SubnetMax is not on a SubnetLen boundary: {subnet_max}")
    return dataclasses.replace(cfg, ipv6_subnet_len=subnet_len, ipv6_subnet_min=subnet_min, ipv6_subnet_max=subnet_max)


def load_config(text: str | bytes) -> NetworkConfig:
    return check_config(parse_config(text))
