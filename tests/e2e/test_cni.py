"""The `flannel` CNI plugin driven as a container runtime drives it (CNI_* variables, config on stdin) against real
namespaces and Debian's bridge and host-local plugins."""

import ipaddress
import json
import os

from testbed.cluster import in_ns


def write_subnet_env(host, ipmasq="false", mtu=1472):
    with open(host.subnet_file, "w") as f:
        f.write(
            f"FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={ipmasq}\n"
        )


def test_add_check_del_follow_the_cni_spec(bed):
    host = bed.hosts[0]
    write_subnet_env(host)
    config = bed.cni_config(host)
    config.pop("delegate")  # as shipped: no delegate section, so the defaults apply
    pod_ns = f"{bed.prefix}-cnipod"
    bed._add_ns(pod_ns)

    added = bed.cni(host, "ADD", "c1", pod_ns, config)
    result = json.loads(added.stdout)
    address = ipaddress.ip_interface(result["ips"][0]["address"])
    assert address.network == ipaddress.ip_network("10.244.7.0/24") and result["ips"][0]["gateway"] == "10.244.7.1"
    # The delegate config kept for DEL is upstream's: bridge, isGateway, ipMasq = !FLANNEL_IPMASQ, mtu, host-local.
    kept = json.load(open(os.path.join(config["dataDir"], "c1")))
    assert (kept["type"], kept["isGateway"], kept["ipMasq"], kept["mtu"], kept["name"]) == (
        "bridge",
        True,
        True,
        1472,
        "flannel-udp",
    )
    assert (
        kept["ipam"]["ranges"] == [[{"subnet": "10.244.7.0/24"}]]
        and {"dst": "10.244.0.0/16", "gw": "10.244.7.1"} in kept["ipam"]["routes"]
    )
    pod_link = json.loads(in_ns(pod_ns, "ip", "-j", "addr", "show", "eth0").stdout)[0]
    assert pod_link["mtu"] == 1472 and any(a["local"] == str(address.ip) for a in pod_link["addr_info"])
    assert "10.244.0.0/16 via 10.244.7.1" in in_ns(pod_ns, "ip", "route").stdout
    bridge = json.loads(in_ns(host.ns, "ip", "-j", "addr", "show", "cni0").stdout)[0]
    assert any(a["local"] == "10.244.7.1" for a in bridge["addr_info"])
    assert bed.ping(pod_ns, "10.244.7.1")

    checked = bed.cni(host, "CHECK", "c1", pod_ns, dict(config, prevResult=result), check=False)
    assert checked.returncode == 0, checked.stdout

    assert bed.cni(host, "DEL", "c1", pod_ns, config).returncode == 0
    assert in_ns(pod_ns, "ip", "link", "show", "eth0", check=False).returncode != 0
    assert not os.path.exists(os.path.join(config["dataDir"], "c1"))
    assert bed.cni(host, "DEL", "c1", pod_ns, config).returncode == 0  # a second DEL is not an error


def test_flannel_masquerading_turns_the_bridges_off_and_delegate_overrides_win(bed):
    host = bed.hosts[0]
    write_subnet_env(host, ipmasq="true")
    pod_ns = f"{bed.prefix}-cnipod"
    bed._add_ns(pod_ns)
    config = dict(bed.cni_config(host), delegate={"bridge": "mynet0", "mtu": 1400})
    bed.cni(host, "ADD", "c2", pod_ns, config)
    kept = json.load(open(os.path.join(config["dataDir"], "c2")))
    assert (kept["ipMasq"], kept["mtu"], kept["bridge"]) == (False, 1400, "mynet0")
    assert in_ns(host.ns, "ip", "link", "show", "mynet0", check=False).returncode == 0


def test_errors_are_cni_error_objects(bed):
    host = bed.hosts[0]
    pod_ns = f"{bed.prefix}-cnipod"
    bed._add_ns(pod_ns)
    missing = bed.cni(host, "ADD", "c3", pod_ns, check=False)  # no subnet.env yet: flanneld is not up
    error = json.loads(missing.stdout)
    assert missing.returncode != 0 and error["code"] == 11 and "subnet.env" in error["msg"]
    write_subnet_env(host)
    bad = bed.cni(host, "ADD", "c3", pod_ns, dict(bed.cni_config(host), delegate={"name": "x"}), check=False)
    assert json.loads(bad.stdout)["msg"] == "'delegate' dictionary must not have 'name' field, it'll be set by flannel"
    version = bed.cni(host, "VERSION", "c3", pod_ns, check=False)
    assert "1.0.0" in json.loads(version.stdout)["supportedVersions"]


def test_dual_stack_subnet_env_gives_both_families_and_check_passes(bed):
    host = bed.hosts[0]
    with open(host.subnet_file, "w") as f:
        f.write(
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\n"
            "FLANNEL_IPV6_SUBNET=fd00:10:244:7::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n"
        )
    config = bed.cni_config(host)
    pod_ns = f"{bed.prefix}-cnipod"
    bed._add_ns(pod_ns)
    result = json.loads(bed.cni(host, "ADD", "c6", pod_ns, config).stdout)
    kept = json.load(open(os.path.join(config["dataDir"], "c6")))
    assert kept["ipam"]["ranges"] == [[{"subnet": "10.244.7.0/24"}], [{"subnet": "fd00:10:244:7::/64"}]]
    assert {"dst": "fd00:10:244::/56", "gw": "fd00:10:244:7::1"} in kept["ipam"]["routes"]
    v6 = [ipaddress.ip_interface(ip["address"]) for ip in result["ips"] if ":" in ip["address"]]
    assert len(v6) == 1 and v6[0].network == ipaddress.ip_network("fd00:10:244:7::/64")
    assert "fd00:10:244::/56 via fd00:10:244:7::1" in in_ns(pod_ns, "ip", "-6", "route").stdout
    assert bed.cni(host, "CHECK", "c6", pod_ns, dict(config, prevResult=result), check=False).returncode == 0
    assert bed.cni(host, "DEL", "c6", pod_ns, config).returncode == 0

    # An IPv6 subnet without its network is a broken file, and the error says which line is missing.
    with open(host.subnet_file) as f:
        text = f.read().replace("FLANNEL_IPV6_NETWORK=fd00:10:244::/56\n", "")
    with open(host.subnet_file, "w") as f:
        f.write(text)
    error = json.loads(bed.cni(host, "ADD", "c7", pod_ns, config, check=False).stdout)
    assert error["msg"] == f"{host.subnet_file} is missing FLANNEL_IPV6_NETWORK"
