"""A Node object as any node of the cluster may annotate it (upstream's flanneld, ours, or a hostile one): its podCIDRs
and flannel's annotations give a lease or a LeaseConversionError, and the annotations we would write for it are
strings; nothing else. The input is JSON: {"annotations": {name: value}, "podCIDRs": [...], "v4": bool, "v6": bool}
with names relative to the prefix; shapes the API server would never send (a number as an annotation) are skipped. The
Node reaches the conversion as a watch event line through the informer's own decoder, and the raw input, read as such
a line, gives a node or one of the decoder's two errors."""

from __future__ import annotations

import json

from lightkube import ApiError

from flannel_udp.subnet.kube.annotations import Annotations, mac_from_backend_data
from flannel_udp.subnet.kube.manager import LeaseConversionError, node_to_lease, wanted_annotations
from flannel_udp.subnet.kube.nodes import NodeStreamError, decode_watch_event

PREFIX = "flannel.alpha.coreos.com/"
ANN = Annotations.from_prefix()


def test_one_input(data: bytes) -> None:
    try:
        decode_watch_event(data)
    except (NodeStreamError, ApiError):
        pass
    try:
        spec = json.loads(data)
    except ValueError:
        return
    if not isinstance(spec, dict):
        return
    annotations, cidrs = spec.get("annotations", {}), spec.get("podCIDRs", [])
    if not (
        isinstance(annotations, dict)
        and all(isinstance(v, str) for v in annotations.values())
        and isinstance(cidrs, list)
        and all(isinstance(c, str) for c in cidrs)
    ):
        return
    annotations = {PREFIX + k: v for k, v in annotations.items()}
    v4, v6 = bool(spec.get("v4", True)), bool(spec.get("v6", False))
    spec_fields = {"podCIDR": cidrs[0], "podCIDRs": cidrs} if cidrs else {}
    event = {"type": "MODIFIED", "object": {"metadata": {"name": "n", "annotations": annotations}, "spec": spec_fields}}
    _, node = decode_watch_event(json.dumps(event).encode())
    mac_from_backend_data(annotations.get(ANN.backend_data))
    try:
        lease = node_to_lease(node, ANN, v4, v6)
    except LeaseConversionError:
        return
    assert (lease.subnet is not None) == v4 and (lease.ipv6_subnet is not None) == v6
    written = wanted_annotations(annotations, lease.attrs, ANN)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in written.items())
