"""Nodes on etcd in namespaces: waiting for an etcd that is not there yet, riding out an etcd outage with the last
known routes, and a 3-member cluster losing the member in use."""

import subprocess
import time

from testbed.cluster import ETCD_FIRST_ADDRESS, UNDERLAY, wait_for

FIRST_ETCD = f"http://{UNDERLAY.network_address + ETCD_FIRST_ADDRESS}:2379"


def test_node_waits_for_etcd_and_its_config_then_starts(bed):
    host = bed.hosts[0]
    bed.start_node(host, "--etcd-endpoints", FIRST_ETCD, wait=False)
    assert wait_for(lambda: "Couldn't fetch network config" in bed.node_log(host), 10), bed.node_log(host)
    assert host.process.poll() is None
    bed.start_etcd()  # and stores the config
    bed.wait_ready(host, timeout=15)
    log = bed.node_log(host)
    assert "Traceback" not in log and log.count("Couldn't fetch network config") <= 2  # said once per cause


OUTAGE = 60  # seconds


def test_a_minute_long_etcd_outage_loses_no_ping_and_a_node_started_in_it_joins_when_etcd_returns(bed):
    bed.start_etcd()
    a, b, late = bed.hosts
    for host in (a, b):
        bed.start_node(host)
        bed.add_pod(host)
    assert wait_for(lambda: bed.ping(a.pods[0].ns, b.pods[0].address, timeout=0.5), 5), bed.logs()
    pinger = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            a.pods[0].ns,
            "ping",
            "-i",
            "0.01",
            "-c",
            str((OUTAGE + 10) * 100),
            "-W",
            "1",
            "-q",
            str(b.pods[0].address),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    bed.extra_processes.append(pinger)
    member = bed.etcd.members[0]
    bed.etcd.stop(member)
    bed.start_node(late, wait=False)  # waits for etcd, as a node rebooted during the outage would
    time.sleep(OUTAGE)
    assert all(h.process.poll() is None for h in (a, b, late)), bed.logs()
    bed.etcd.start(member)
    bed.wait_ready(late, timeout=5)  # its lease soon after etcd's return (it took < 2 s here)
    late_pod = bed.add_pod(late)
    assert wait_for(lambda: bed.ping(a.pods[0].ns, late_pod.address, timeout=0.3), 2.5), bed.logs()
    out, _ = pinger.communicate(timeout=OUTAGE + 40)
    assert " 0% packet loss" in out, out  # the last known routes carried the traffic throughout
    for host in (a, b):
        log = bed.node_log(host)
        assert log.count("Lost the etcd watch") == 1 and log.count("is reachable again") == 1, log  # once each
    assert bed.node_log(late).count("Couldn't fetch network config") <= 2, bed.node_log(late)  # once per cause


def test_three_member_etcd_losing_a_member_does_not_disturb_the_nodes(bed):
    etcd = bed.start_etcd(members=3)
    a, b = bed.hosts[0], bed.hosts[1]
    for host in (a, b):
        bed.start_node(host)
        bed.add_pod(host)
    assert wait_for(lambda: bed.ping(a.pods[0].ns, b.pods[0].address, timeout=0.5), 5), bed.logs()
    etcd.stop(etcd.members[0], kill=True)
    late = bed.hosts[2]
    bed.start_node(late, timeout=20)
    late_pod = bed.add_pod(late)
    assert wait_for(lambda: bed.ping(a.pods[0].ns, late_pod.address, timeout=0.3), 5), bed.logs()
    assert bed.ping(b.pods[0].ns, late_pod.address)
    assert a.process.poll() is None and b.process.poll() is None


def test_an_unreachable_etcd_is_said_once_whatever_the_wording(bed):
    host = bed.hosts[0]
    bed.start_node(host, "--etcd-endpoints", FIRST_ETCD, "-v", "1", wait=False)
    # Several tries (each said at debug level); gRPC's reason text changes between them (timeouts, no route, ...).
    assert wait_for(lambda: bed.node_log(host).count("Network config not fetched yet") >= 4, 30), bed.node_log(host)
    assert host.process.poll() is None
    assert bed.node_log(host).count("Couldn't fetch network config") == 1, bed.node_log(host)


def test_sigterm_while_etcd_is_unreachable_ends_the_node_at_once(bed):
    """Kubernetes kills a pod 30 s after SIGTERM and systemd after 90 s: a node waiting for etcd must stop when told."""
    import signal

    host = bed.hosts[0]
    bed.start_node(host, "--etcd-endpoints", FIRST_ETCD, wait=False)
    assert wait_for(lambda: "Couldn't fetch network config" in bed.node_log(host), 15), bed.node_log(host)
    host.process.send_signal(signal.SIGTERM)
    assert host.process.wait(5) == 0, bed.node_log(host)
    assert bed.node_log(host).rstrip().endswith("Exiting cleanly...")
