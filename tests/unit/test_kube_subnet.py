"""The Kubernetes subnet manager's pure logic: upstream's pkg/subnet/kube annotations_test.go, containsCIDR and the
nodeToLease fuzz seeds (fuzz_test.go), plus the annotations AcquireLease writes and the update filter."""

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lightkube.models.core_v1 import NodeSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Node

from flannel_udp.subnet.kube.annotations import AnnotationPrefixError, Annotations, mac_from_backend_data
from flannel_udp.subnet.kube.manager import (
    LeaseConversionError,
    contains_cidr,
    lease_relevant_change,
    node_to_lease,
    pod_cidrs,
    wanted_annotations,
)
from flannel_udp.subnet.lease import LeaseAttrs

net = ipaddress.ip_network
ANN = Annotations.from_prefix()


@pytest.mark.parametrize(
    "prefix, key",
    [
        ("flannel.alpha.coreos.com", "flannel.alpha.coreos.com/backend-type"),
        ("flannel.alpha.coreos.com/", "flannel.alpha.coreos.com/backend-type"),
        ("flannel.alpha.coreos.com/prefix", "flannel.alpha.coreos.com/prefix-backend-type"),
        ("flannel.alpha.coreos.com/prefix-", "flannel.alpha.coreos.com/prefix-backend-type"),
        ("org.com", "org.com/backend-type"),
        ("org9.com", "org9.com/backend-type"),
        ("org.com/9", "org.com/9-backend-type"),
    ],
)
def test_annotation_prefix_gives_upstreams_keys(prefix, key):
    assert Annotations.from_prefix(prefix).backend_type == key


@pytest.mark.parametrize("prefix", ["org", "org/", "org/prefix", "org.COM", "org.com/PREFIX", "a.com/b/c"])
def test_bad_annotation_prefixes_are_refused(prefix):
    with pytest.raises(AnnotationPrefixError, match="subnet/kube: prefix"):
        Annotations.from_prefix(prefix)


def test_every_annotation_key_of_the_default_prefix():
    assert (
        ANN.kube_managed,
        ANN.backend_data,
        ANN.backend_v6_data,
        ANN.public_ip,
        ANN.public_ipv6,
        ANN.node_public_ip,
        ANN.public_ip_overwrite,
    ) == (
        "flannel.alpha.coreos.com/kube-subnet-manager",
        "flannel.alpha.coreos.com/backend-data",
        "flannel.alpha.coreos.com/backend-v6-data",
        "flannel.alpha.coreos.com/public-ip",
        "flannel.alpha.coreos.com/public-ipv6",
        "flannel.alpha.coreos.com/node-public-ip",
        "flannel.alpha.coreos.com/public-ip-overwrite",
    )


@pytest.mark.parametrize(
    "outer, inner, expected",
    [
        ("10.244.0.0/16", "10.244.0.0/16", True),
        ("10.244.0.0/16", "10.244.0.0/24", True),
        ("10.244.0.0/16", "10.244.255.0/24", True),
        ("10.244.0.0/16", "10.244.0.0/15", False),
        ("10.244.0.0/16", "192.168.0.0/24", False),
        ("2001:db8:1234::/48", "2001:db8:1234::/48", True),
        ("2001:db8:1234::/48", "2001:db8:1234::/64", True),
        ("2001:db8:1234::/48", "2001:db8:1234:ffff::/64", True),
        ("2001:db8:1234::/48", "2001:db8:1234::/47", False),
        ("2001:db8:1234::/48", "fe02::/32", False),
    ],
)
def test_contains_cidr(outer, inner, expected):
    assert contains_cidr(net(outer, strict=False), net(inner, strict=False)) is expected


def node(name="n1", annotations=None, pod_cidr=None, pod_cidrs=None) -> Node:
    return Node(
        metadata=ObjectMeta(name=name, annotations=annotations), spec=NodeSpec(podCIDR=pod_cidr, podCIDRs=pod_cidrs)
    )


VXLAN_ANNOTATIONS = {
    ANN.kube_managed: "true",
    ANN.backend_type: "vxlan",
    ANN.public_ip: "198.18.0.2",
    ANN.backend_data: '{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}',
}


def test_node_to_lease_reads_the_annotations_and_the_ipv4_pod_cidr():
    lease = node_to_lease(
        node(annotations=VXLAN_ANNOTATIONS, pod_cidrs=["fd00::/64", "10.244.1.0/24"]), ANN, True, False
    )
    assert lease.subnet == net("10.244.1.0/24") and lease.ipv6_subnet is None
    assert str(lease.attrs.public_ip) == "198.18.0.2" and lease.attrs.backend_type == "vxlan"
    assert lease.attrs.backend_data == {"VNI": 1, "VtepMAC": "12:c6:65:89:b4:e3"}
    assert lease.expiration is None


def test_node_to_lease_dual_stack():
    annotations = dict(
        VXLAN_ANNOTATIONS,
        **{ANN.public_ipv6: "fd00:198:18::2", ANN.backend_v6_data: '{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}'},
    )
    lease = node_to_lease(
        node(annotations=annotations, pod_cidrs=["10.244.1.0/24", "fd00:10:244:1::/64"]), ANN, True, True
    )
    assert lease.ipv6_subnet == net("fd00:10:244:1::/64") and str(lease.attrs.public_ipv6) == "fd00:198:18::2"
    assert lease.attrs.backend_v6_data["VtepMAC"] == "aa:bb:cc:dd:ee:ff"


def test_a_udp_nodes_null_backend_data_is_no_backend_data():
    annotations = {
        ANN.kube_managed: "true",
        ANN.backend_type: "",
        ANN.public_ip: "198.18.0.3",
        ANN.backend_data: "null",
    }
    lease = node_to_lease(node(annotations=annotations, pod_cidr="10.244.2.0/24"), ANN, True, False)
    assert lease.attrs.backend_data is None and lease.attrs.backend_type == ""


@pytest.mark.parametrize(
    "annotations, cidrs, message",
    [
        ({ANN.public_ip: "not-an-ip"}, ["10.244.1.0/24"], "public-ip"),
        ({ANN.public_ip: "198.18.0.2"}, ["fd00::/64"], "missing IPv4 address"),
        ({ANN.public_ip: "198.18.0.2"}, ["10.0.0.0/24", "10.0.1.0/24", "fd00::/64"], "IPv4/IPv6 only or dualstack"),
        ({ANN.public_ip: "198.18.0.2"}, ["not-a-cidr"], "invalid pod CIDR"),
        ({ANN.public_ip: "198.18.0.2", ANN.backend_data: "{"}, ["10.244.1.0/24"], "not JSON"),
    ],
)
def test_node_to_lease_refusals(annotations, cidrs, message):
    with pytest.raises(LeaseConversionError, match=message):
        node_to_lease(node(annotations=annotations, pod_cidrs=cidrs), ANN, True, False)


# upstream fuzz_test.go seeds: (publicIP, publicIPv6, podCIDR, type, v4, v6), each with the outcome it must have: a
# lease (its subnet, IPv6 subnet, backend type) or the conversion error's words.
FUZZ_SEEDS = [
    ("192.168.0.1", "fc00::1", "10.244.1.0/24", "vxlan", True, False, ("10.244.1.0/24", None, "vxlan")),
    ("", "", "fc00::/64", "host-gw", False, True, "invalid flannel.alpha.coreos.com/public-ipv6: ''"),
    ("not-an-ip", "not-an-ip", "not-a-cidr", "", True, True, "node 'n1' has an invalid pod CIDR 'not-a-cidr'"),
    ("192.168.0.1", "fc00::1", "fc00::/64", "vxlan", True, False, "missing IPv4 address on n.Spec.PodCIDRs"),
    ("::1", "192.168.0.1", "10.244.1.0/24", "wireguard", False, True, "invalid flannel.alpha.coreos.com/public-ipv6"),
]


@pytest.mark.parametrize("public_ip, public_ipv6, cidr, kind, v4, v6, expected", FUZZ_SEEDS)
def test_node_to_lease_fuzz_seeds_give_a_lease_or_a_conversion_error(
    public_ip, public_ipv6, cidr, kind, v4, v6, expected
):
    n = node(
        annotations={ANN.public_ip: public_ip, ANN.public_ipv6: public_ipv6, ANN.backend_type: kind}, pod_cidr=cidr
    )
    if isinstance(expected, str):
        with pytest.raises(LeaseConversionError) as info:
            node_to_lease(n, ANN, v4, v6)
        assert str(info.value).startswith(expected)
        return
    lease = node_to_lease(n, ANN, v4, v6)
    subnet, ipv6_subnet, backend_type = expected
    assert str(lease.subnet) == subnet and lease.attrs.backend_type == backend_type
    assert (str(lease.ipv6_subnet) if lease.ipv6_subnet else None) == ipv6_subnet


@given(
    st.dictionaries(
        st.sampled_from([ANN.public_ip, ANN.public_ipv6, ANN.backend_data, ANN.backend_v6_data, ANN.backend_type]),
        st.text(max_size=40),
    ),
    st.lists(st.text(max_size=30), max_size=3),
    st.booleans(),
    st.booleans(),
)
def test_node_to_lease_never_fails_otherwise(annotations, cidrs, v4, v6):
    try:
        node_to_lease(node(annotations=annotations, pod_cidrs=cidrs), ANN, v4, v6)
    except LeaseConversionError:
        pass


def test_pod_cidr_alone_is_used_when_pod_cidrs_is_empty():
    assert pod_cidrs(node(pod_cidr="10.244.7.0/24")) == (net("10.244.7.0/24"), None)


def test_acquire_writes_upstreams_annotations_for_vxlan_udp_and_host_gw():
    vxlan = LeaseAttrs(ipaddress.IPv4Address("198.18.0.1"), None, "vxlan", {"VNI": 1, "VtepMAC": "12:c6:65:89:b4:e3"})
    assert wanted_annotations({}, vxlan, ANN) == {
        ANN.backend_type: "vxlan",
        ANN.backend_data: '{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}',
        ANN.public_ip: "198.18.0.1",
        ANN.kube_managed: "true",
    }
    udp = LeaseAttrs(ipaddress.IPv4Address("198.18.0.1"))
    assert wanted_annotations({}, udp, ANN) == {
        ANN.backend_type: "",
        ANN.backend_data: "null",
        ANN.public_ip: "198.18.0.1",
        ANN.kube_managed: "true",
    }
    hostgw6 = LeaseAttrs(ipaddress.IPv4Address("198.18.0.1"), ipaddress.IPv6Address("fd00::1"), "host-gw")
    assert wanted_annotations({}, hostgw6, ANN)[ANN.public_ipv6] == "fd00::1"
    assert wanted_annotations({}, hostgw6, ANN)[ANN.backend_v6_data] == "null"


def test_ipv6_only_leases_and_annotations_as_upstream_writes_them():
    """IPv6-only (upstream's kube.go): vxlan writes no IPv4 annotation (its BackendData is null); host-gw and udp
    write BackendData null and the zero PublicIP; the peer's lease has the IPv6 side alone."""
    zero, v6 = ipaddress.IPv4Address(0), ipaddress.IPv6Address("fd00:198:18::2")
    vxlan = LeaseAttrs(zero, v6, "vxlan", None, {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"})
    assert wanted_annotations({}, vxlan, ANN) == {
        ANN.backend_type: "vxlan",
        ANN.backend_v6_data: '{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}',
        ANN.public_ipv6: "fd00:198:18::2",
        ANN.kube_managed: "true",
    }
    hostgw = wanted_annotations({}, LeaseAttrs(zero, v6, "host-gw"), ANN)
    assert (hostgw[ANN.public_ip], hostgw[ANN.backend_data], hostgw[ANN.backend_v6_data]) == ("0.0.0.0", "null", "null")
    annotations = {k: v for k, v in hostgw.items()}
    lease = node_to_lease(node(annotations=annotations, pod_cidrs=["fd00:10:244:3::/64"]), ANN, False, True)
    assert lease.subnet is None and lease.ipv6_subnet == net("fd00:10:244:3::/64")
    assert lease.attrs.public_ipv6 == v6 and lease.primary == lease.ipv6_subnet
    with pytest.raises(LeaseConversionError, match="missing IPv6 address"):
        node_to_lease(node(annotations=annotations, pod_cidrs=["10.244.3.0/24"]), ANN, False, True)


def test_public_ip_overwrite_is_published_instead_of_the_detected_address():
    udp = LeaseAttrs(ipaddress.IPv4Address("198.18.0.1"))
    assert wanted_annotations({ANN.public_ip_overwrite: "203.0.113.9"}, udp, ANN)[ANN.public_ip] == "203.0.113.9"


def test_only_backend_data_type_or_public_ip_changes_are_lease_updates():
    old = node(annotations=VXLAN_ANNOTATIONS, pod_cidr="10.244.1.0/24")
    relabelled = node(annotations=dict(VXLAN_ANNOTATIONS, other="x"), pod_cidr="10.244.1.0/24")
    moved = node(annotations=dict(VXLAN_ANNOTATIONS, **{ANN.public_ip: "198.18.0.9"}), pod_cidr="10.244.1.0/24")
    assert not lease_relevant_change(old, relabelled, ANN, True, False)
    assert lease_relevant_change(old, moved, ANN, True, False)


def test_in_dual_stack_a_change_of_either_family_is_a_lease_update():
    """Upstream's handleUpdateLeaseEvent lets the IPv6 comparison overwrite the IPv4 one, so a peer whose IPv4
    public IP or backend data changed kept its old route until a relist; here either family's change counts."""
    dual = dict(VXLAN_ANNOTATIONS, **{ANN.public_ipv6: "fd00::1", ANN.backend_v6_data: '{"VNI":1}'})
    old = node(annotations=dual, pod_cidr="10.244.1.0/24")
    moved4 = node(annotations=dict(dual, **{ANN.public_ip: "198.18.0.9"}), pod_cidr="10.244.1.0/24")
    moved6 = node(annotations=dict(dual, **{ANN.public_ipv6: "fd00::9"}), pod_cidr="10.244.1.0/24")
    relabelled = node(annotations=dict(dual, other="x"), pod_cidr="10.244.1.0/24")
    assert lease_relevant_change(old, moved4, ANN, True, True)
    assert lease_relevant_change(old, moved6, ANN, True, True)
    assert not lease_relevant_change(old, relabelled, ANN, True, True)


@pytest.mark.parametrize(
    "value, mac",
    [
        ('{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}', "12:c6:65:89:b4:e3"),
        ("null", ""),
        ("", ""),
        (None, ""),
        # Another key order defeats upstream's parsing; the manager then drops what is not a MAC.
        ('{"VtepMAC":"aa:bb:cc:dd:ee:ff","VNI":1}', 'aa:bb:cc:dd:ee:ff","VNI":1'),
    ],
)
def test_stored_mac_parsing_as_upstream(value, mac):
    assert mac_from_backend_data(value) == mac


def test_client_configuration_in_a_pod_from_the_service_account(tmp_path, monkeypatch):
    from flannel_udp.subnet.kube import client as kube_client

    (tmp_path / "token").write_text("pod-token")
    (tmp_path / "namespace").write_text("kube-flannel")
    (tmp_path / "ca.crt").write_text("")
    monkeypatch.setattr(kube_client, "SERVICE_ACCOUNT", str(tmp_path))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "198.18.0.200")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "6443")
    single = kube_client.load_config(kube_client.KubeOptions()).get()
    assert single.cluster.server == "https://198.18.0.200:6443" and single.user.token == "pod-token"


def test_client_configuration_kubeconfig_server_replaced_by_api_url(tmp_path):
    from flannel_udp.subnet.kube import client as kube_client

    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nclusters:\n- name: c\n  cluster: {server: 'https://10.0.0.1:6443'}\n"
        "users:\n- name: u\n  user: {token: t}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\n"
        "current-context: x\n"
    )
    opts = kube_client.KubeOptions(kubeconfig_file=str(path), api_url="https://198.18.0.200:6443")
    single = kube_client.load_config(opts).get()
    assert single.cluster.server == "https://198.18.0.200:6443" and single.user.token == "t"


@pytest.mark.parametrize(
    "text, message",
    [
        ("current-context: nowhere\nclusters: []\ncontexts: []\n", "invalid kubeconfig"),
        ("- just a list\n", "invalid kubeconfig"),
        ("garbage: [\n", 'error loading config file ".*": not YAML: .* at line 2'),
        ("", "invalid configuration: no configuration has been provided in "),
        ("# nothing but a comment\n", "invalid configuration: no configuration has been provided in "),
        ("apiVersion: v1\nkind: Config\n", "invalid kubeconfig .*: no 'clusters'"),
        (
            "clusters:\n- name: c\n  cluster: {server: 'https://10.0.0.1:6443'}\ncontexts:\n- name: x\n"
            "  context: {cluster: c}\ncurrent-context: x\n",
            "context 'x' names no user",
        ),
    ],
)
def test_bad_kubeconfig_is_one_line(tmp_path, text, message):
    from flannel_udp.subnet.kube import client as kube_client

    path = tmp_path / "kubeconfig"
    path.write_text(text)
    with pytest.raises(kube_client.KubeConfigError, match=message) as info:
        kube_client.load_config(kube_client.KubeOptions(kubeconfig_file=str(path)))
    assert "\n" not in str(info.value)


def test_api_url_alone_is_a_configuration_without_credentials(monkeypatch):
    """client-go's BuildConfigFromFlags(url, ""): the server and no credentials, so that requests go out
    unauthenticated (to an API server or a `kubectl proxy` that allows it) instead of failing inside the client."""
    from flannel_udp.subnet.kube import client as kube_client

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = kube_client.load_config(kube_client.KubeOptions(api_url="http://127.0.0.1:8001"))
    single = config.get()
    assert single.cluster.server == "http://127.0.0.1:8001"
    assert single.user.token is None and single.user.username is None and single.user.exec is None
    kube_client.make_client(config)  # lightkube asserted "Missing user" here


def test_no_configuration_at_all_is_upstreams_message(monkeypatch):
    from flannel_udp.subnet.kube import client as kube_client

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(kube_client.KubeConfigError, match="no configuration has been provided"):
        kube_client.load_config(kube_client.KubeOptions())


def test_too_many_requests_is_waited_out_whatever_shape_it_comes_in():
    """kube-apiserver's max-in-flight answers 429 with or without a Status body; either is a busy server to wait for,
    not a refusal that ends the node (1,000 nodes starting together got the bare one)."""
    import httpx2 as httpx

    from flannel_udp.subnet.kube.client import is_unavailable

    request = httpx.Request("PATCH", "https://127.0.0.1:6443/api/v1/nodes/n1/status")
    for code, busy in ((429, True), (503, True), (403, False), (422, False)):
        response = httpx.Response(code, request=request)
        error = httpx.HTTPStatusError(f"{code}", request=request, response=response)
        assert is_unavailable(error) is busy, code


# A Node as kube-apiserver writes it, with the fields flannel never reads (status, managedFields) left in.
API_NODE = {
    "kind": "Node",
    "apiVersion": "v1",
    "metadata": {
        "name": "n7",
        "uid": "0d5e8f3c-4a1b-4c7e-9b43-2f1d2f4d9a10",
        "resourceVersion": "4242",
        "labels": {"kubernetes.io/hostname": "n7"},
        "annotations": VXLAN_ANNOTATIONS,
        "managedFields": [{"manager": "flanneld", "operation": "Update", "fieldsV1": {"f:metadata": {}}}],
    },
    "spec": {"podCIDR": "10.244.7.0/24", "podCIDRs": ["10.244.7.0/24"], "taints": [{"key": "k", "effect": "x"}]},
    "status": {
        "conditions": [{"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}],
        "addresses": [{"type": "InternalIP", "address": "198.18.0.7"}],
        "images": [{"names": ["registry.example/app:1"], "sizeBytes": 123}],
    },
}


def test_an_api_servers_node_decodes_to_the_same_lease_as_the_full_model():
    import json

    from flannel_udp.subnet.kube.nodes import decode_node_list, decode_watch_event

    line = json.dumps({"type": "MODIFIED", "object": API_NODE}).encode()
    kind, lean = decode_watch_event(line)
    assert kind == "MODIFIED" and lean.metadata.name == "n7" and lean.metadata.resourceVersion == "4242"
    full = Node.from_dict(API_NODE)
    assert node_to_lease(lean, ANN, True, False) == node_to_lease(full, ANN, True, False)
    listing = {"kind": "NodeList", "metadata": {"resourceVersion": "4243", "continue": "abc"}, "items": [API_NODE]}
    nodes, version, token = decode_node_list(json.dumps(listing).encode())
    assert [n.metadata.name for n in nodes] == ["n7"] and (version, token) == ("4243", "abc")


def test_watch_errors_and_bookmarks():
    """ERROR carries a Status: 410 Gone must reach the informer as ApiError 410 (it lists again); a BOOKMARK is only a
    version; anything else from the server is a NodeStreamError, never a crash of the watch task."""
    from lightkube import ApiError

    from flannel_udp.subnet.kube.nodes import NodeStreamError, decode_watch_event

    gone = b'{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",'
    gone += b'"message":"too old resource version: 1 (4242)","reason":"Expired","code":410}}'
    with pytest.raises(ApiError) as raised:
        decode_watch_event(gone)
    assert raised.value.status.code == 410 and "too old" in raised.value.status.message
    kind, mark = decode_watch_event(b'{"type":"BOOKMARK","object":{"kind":"Node","metadata":{"resourceVersion":"9"}}}')
    assert kind == "BOOKMARK" and mark.metadata.resourceVersion == "9"
    bad_utf8 = (
        b'{"type":"ADDED","object":{"metadata":{"name":"\xa2"}}}'  # not UTF-8: the decoder's own error, never a crash
    )
    wrong_type = b'{"type":"ADDED","object":{"metadata":{"annotations":{"a":1}}}}'
    for bad in (b"<html>", b'{"type":"ADDED"}', wrong_type, bad_utf8):
        with pytest.raises(NodeStreamError):
            decode_watch_event(bad)


def test_watch_lines_cut_anywhere_by_the_stream_come_out_whole():
    from flannel_udp.subnet.kube.nodes import LineSplitter

    stream = b'{"a":1}\n{"b":2}\n\n{"c":3}\n'
    for cut in range(1, len(stream)):
        splitter = LineSplitter()
        lines = splitter.feed(stream[:cut]) + splitter.feed(stream[cut:])
        assert lines == [b'{"a":1}', b'{"b":2}', b'{"c":3}'] and splitter.pending == b"", cut
