"""The CNI plugin's port records, which decide what the node agent may enslave to a rebuilt cni0."""

import os

from flannel_udp import cni_ports

BRIDGE = {"type": "bridge", "hairpinMode": True}


def result(*interfaces):
    return {"cniVersion": "1.0.0", "interfaces": list(interfaces)}


def test_the_host_side_veth_is_recorded_not_the_pod_side_one():
    record = cni_ports.record_from_result(
        "c1",
        BRIDGE,
        result(
            {"name": "cni0", "mac": "02:00:00:00:00:01"},
            {"name": "eth0", "mac": "02:00:00:00:00:03", "sandbox": "/var/run/netns/pod"},
            {"name": "lo", "mac": "00:00:00:00:00:00"},  # the host-side entry; lo exists everywhere, index 1
        ),
    )
    assert record == cni_ports.PortRecord("c1", "cni0", "02:00:00:00:00:01", "lo", 1, True)


def test_nothing_is_recorded_for_other_delegates_old_results_or_malformed_output():
    assert (
        cni_ports.record_from_result(
            "c", {"type": "ptp"}, result({"name": "cni0", "mac": "x"}, {"name": "lo", "mac": "y"})
        )
        is None
    )
    assert cni_ports.record_from_result("c", BRIDGE, {"cniVersion": "0.2.0", "ip4": {}}) is None
    assert (
        cni_ports.record_from_result(
            "c", BRIDGE, result({"name": "cni0", "mac": "x"}, {"name": "../../etc", "mac": "y"})
        )
        is None
    )
    assert (
        cni_ports.record_from_result("c", BRIDGE, result({"name": "cni0", "mac": "x"}, {"name": "gone0", "mac": "y"}))
        is None
    )
    assert cni_ports.record_from_result("c", BRIDGE, result("cni0", 7, {"name": ["lo"]})) is None
    # The delegate's own bridge name is the one looked for.
    named = cni_ports.record_from_result(
        "c",
        {"type": "bridge", "bridge": "br7"},
        result({"name": "br7", "mac": "02:00:00:00:00:07"}, {"name": "lo", "mac": "y"}),
    )
    assert named.bridge == "br7" and named.veth == "lo" and not named.hairpin


def test_records_round_trip_and_damaged_ones_are_skipped(tmp_path):
    data_dir = str(tmp_path / "flannel")
    record = cni_ports.PortRecord("c1", "cni0", "02:00:00:00:00:01", "veth1", 7, False)
    cni_ports.write(data_dir, record)
    with open(os.path.join(cni_ports.ports_dir(data_dir), "c2"), "w") as f:
        f.write("{not json")
    with open(os.path.join(cni_ports.ports_dir(data_dir), "c3"), "w") as f:
        f.write('{"bridge": "cni0"}')
    (read,) = cni_ports.read_all(data_dir)
    assert read == cni_ports.PortRecord("c1", "cni0", "02:00:00:00:00:01", "veth1", 7, False, read.written)
    cni_ports.remove(data_dir, "c1")
    cni_ports.remove(data_dir, "c1")  # a second DEL is fine
    assert [r.container for r in cni_ports.read_all(data_dir)] == []
    assert cni_ports.ports_dir(data_dir + "/") == data_dir + "-ports"
