"""The node annotations through which flannel nodes publish their leases in kube mode (upstream annotations.go).

The prefix rules and error texts are upstream's: at most one `/`; without one, `/` is appended; a prefix that then ends
in neither `/` nor `-` gets `-`; the result must look like `fqdn/[name-]`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "flannel.alpha.coreos.com"

# Unanchored at the start, as upstream's regexp.MatchString; \Z because Python's $ also matches before a newline.
_PREFIX_RE = re.compile(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?\Z")


class AnnotationPrefixError(ValueError):
    pass


@dataclass(frozen=True)
class Annotations:
    raw_prefix: str  # -kube-annotation-prefix as given: upstream builds the stored-MAC keys from it (a QUIRK kept)
    kube_managed: str
    backend_data: str
    backend_v6_data: str
    backend_type: str
    public_ip: str
    public_ipv6: str
    node_public_ip: str
    node_public_ipv6: str
    public_ip_overwrite: str
    public_ipv6_overwrite: str

    @classmethod
    def from_prefix(cls, prefix: str = DEFAULT_PREFIX) -> Annotations:
        raw = prefix
        slashes = prefix.count("/")
        if slashes > 1:
            raise AnnotationPrefixError("subnet/kube: prefix can contain at most single slash")
        if slashes == 0:
            prefix += "/"
        if not prefix.endswith(("/", "-")):
            prefix += "-"
        if _PREFIX_RE.search(prefix) is None:
            raise AnnotationPrefixError("subnet/kube: prefix must be in a format: fqdn/[0-9a-z-_]*")
        return cls(
            raw,
            prefix + "kube-subnet-manager",
            prefix + "backend-data",
            prefix + "backend-v6-data",
            prefix + "backend-type",
            prefix + "public-ip",
            prefix + "public-ipv6",
            prefix + "node-public-ip",
            prefix + "node-public-ipv6",
            prefix + "public-ip-overwrite",
            prefix + "public-ipv6-overwrite",
        )

    @property
    def stored_mac_keys(self) -> tuple[str, str]:
        """Where upstream looks for the VTEP MACs of a previous run: `<raw prefix>/backend-data` (and -v6-), which is
        the written key only for prefixes without a slash of their own."""
        return f"{self.raw_prefix}/backend-data", f"{self.raw_prefix}/backend-v6-data"


def mac_from_backend_data(value: str | None) -> str:
    """Upstream's GetStoredMacAddresses parsing: trim `"` and `}` at both ends, split on `:"`, take the second of
    exactly two parts. `{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}` gives `12:c6:65:89:b4:e3`; anything else gives ""."""
    if not value:
        return ""
    parts = value.strip('"}').split(':"')
    return parts[1] if len(parts) == 2 else ""
