"""The etcd store against real etcd servers on loopback: upstream's registry, watch, renew and compaction cases
(pkg/subnet/etcd/registry_test.go), reservations, hostile content, restarts and a 3-member cluster losing a member."""

import asyncio
import ipaddress
import json
import logging
import secrets
import time

import pytest

from flannel_udp.subnet.config import load_config
from flannel_udp.subnet.etcd.client import EtcdOptions
from flannel_udp.subnet.etcd.registry import CONFIG_NOT_FOUND, ConfigNotFound, EtcdRegistry
from flannel_udp.subnet.lease import Events, EventType, LeaseAttrs, LeaseRemoved, Snapshot
from flannel_udp.subnet.manager import Manager
from flannel_udp.subnet.registry import StoreError, StoreUnavailable
from flannel_udp.subnet.watcher import LeaseWatcher
from testbed.etcdserver import EtcdCluster
from testbed.stores import etcd_revision, put_raw

net = ipaddress.ip_network
ip = ipaddress.ip_address
DAY = 86400


@pytest.fixture(scope="module")
def etcd():
    with EtcdCluster() as cluster:
        yield cluster


@pytest.fixture
async def registry(etcd):
    """A registry under a prefix of its own, so that tests sharing the server never see each other's keys."""
    reg = EtcdRegistry(EtcdOptions(endpoints=etcd.endpoints, prefix=f"/test-{secrets.token_hex(4)}/network"))
    yield reg
    await reg.close()


async def next_result(watch, timeout: float = 3.0):
    return await asyncio.wait_for(watch.__anext__(), timeout)


async def next_events(watch, timeout: float = 3.0) -> Events:
    result = await next_result(watch, timeout)
    assert isinstance(result, Events), result
    return result


async def collect_events(watch, count: int) -> list:
    """The next `count` lease events, however etcd groups them into responses."""
    events: list = []
    while len(events) < count:
        events += (await next_events(watch)).events
    assert len(events) == count, events
    return events


async def test_registry_matches_upstream(registry):
    """TestEtcdRegistry: config missing, config round trip, exact key and value, delete, and a watch from the start."""
    with pytest.raises(
        ConfigNotFound, match="flannel config not found in etcd store. Did you create your config using etcdv3 API?"
    ):
        await registry.get_network_config()
    text = '{ "Network": "10.1.0.0/16", "Backend": { "Type": "host-gw" } }'
    await registry.put_network_config(text)
    assert await registry.get_network_config() == text.encode()
    start = await etcd_revision(registry)

    expiration = await registry.create_subnet(net("10.1.5.0/24"), None, LeaseAttrs(ip("1.2.3.4")), DAY)
    assert expiration > time.time() + DAY - 5
    raw = await registry.client.get(registry.subnet_key(net("10.1.5.0/24"), None))
    assert registry.subnet_key(net("10.1.5.0/24"), None) == registry.subnets_key.encode() + b"/10.1.5.0-24"
    assert raw.value == b'{"PublicIP":"1.2.3.4","PublicIPv6":null}'
    leases, _ = await registry.get_subnets()
    assert [lease.subnet for lease in leases] == [net("10.1.5.0/24")]

    await registry.delete_subnet(net("10.1.5.0/24"), None)
    assert await registry.client.get(registry.subnet_key(net("10.1.5.0/24"), None)) is None
    watch = registry.watch_subnets(since=start)
    added, removed = await collect_events(watch, 2)
    assert (added.type, added.subnet, removed.type, removed.subnet) == (
        EventType.ADDED,
        net("10.1.5.0/24"),
        EventType.REMOVED,
        net("10.1.5.0/24"),
    )
    await watch.aclose()


def fixture_config():
    return load_config('{ "Network": "10.3.0.0/16", "SubnetMin": "10.3.1.0", "SubnetMax": "10.3.25.0" }')


async def put_fixture_leases(registry):
    for third in (1, 2, 4, 5, 31):
        await registry.create_subnet(net(f"10.3.{third}.0/24"), None, LeaseAttrs(ip("1.1.1.1")), DAY)


async def test_acquire_reuse_and_previous_subnet(registry):
    """TestAcquireLease against the real store."""
    await put_fixture_leases(registry)
    mine = LeaseAttrs(ip("1.2.3.4"))
    lease = await Manager(registry, fixture_config()).acquire_lease(mine)
    free = {net(f"10.3.{i}.0/24") for i in [3] + list(range(6, 26))}
    assert lease.subnet in free
    assert (await Manager(registry, fixture_config()).acquire_lease(mine)).subnet == lease.subnet
    await registry.delete_subnet(lease.subnet, None)
    again = await Manager(registry, fixture_config(), previous=(net("10.3.6.0/24"), None)).acquire_lease(mine)
    assert again.subnet == net("10.3.6.0/24")


async def test_config_change_deletes_the_old_lease(registry):
    mine = LeaseAttrs(ip("1.2.3.4"))
    old = await Manager(registry, fixture_config()).acquire_lease(mine)
    new = await Manager(registry, load_config('{ "Network": "10.4.0.0/16" }')).acquire_lease(mine)
    assert new.subnet.subnet_of(net("10.4.0.0/16"))
    assert old.subnet not in [lease.subnet for lease in (await registry.get_subnets())[0]]


async def test_watch_reports_added_leases_but_never_the_own(registry):
    """TestWatchLeaseAdded."""
    await put_fixture_leases(registry)
    own = await Manager(registry, fixture_config()).acquire_lease(LeaseAttrs(ip("1.2.3.4")))
    watcher = LeaseWatcher(own.subnet)
    watch = registry.watch_subnets()
    snapshot = watcher.apply(await next_result(watch))
    assert own.subnet not in [e.subnet for e in snapshot] and len(snapshot) == 5
    await Manager(registry, fixture_config()).renew_lease(own)  # an event for the own key
    await registry.create_subnet(net("10.3.30.0/24"), None, LeaseAttrs(ip("1.1.1.2")), DAY)
    batches = []
    while not batches or batches[-1] == []:
        batches.append(watcher.apply(await next_events(watch)))
    assert [(e.type, e.subnet) for e in batches[-1]] == [(EventType.ADDED, net("10.3.30.0/24"))]
    await watch.aclose()


async def test_expired_lease_becomes_a_removal(registry):
    """TestWatchLeaseRemoved: an etcd lease of 3 s runs out and the key's deletion is reported with its attrs."""
    watcher = LeaseWatcher(net("10.3.1.0/24"))
    watch = registry.watch_subnets()
    watcher.apply(await next_result(watch))
    await registry.create_subnet(net("10.3.31.0/24"), None, LeaseAttrs(ip("1.1.1.1")), 3)
    added = watcher.apply(await next_events(watch))
    assert [(e.type, e.subnet) for e in added] == [(EventType.ADDED, net("10.3.31.0/24"))]
    removed = watcher.apply(await next_events(watch, timeout=10))
    # A removal names the key only: the store has no value left to report.
    assert removed == [LeaseRemoved(net("10.3.31.0/24"))]
    await watch.aclose()


async def test_renew_gives_a_fresh_ttl_and_keeps_the_attrs(registry):
    """TestRenewLease, with upstream's vxlan attrs."""
    attrs = LeaseAttrs(ip("1.2.3.4"), backend_type="vxlan", backend_data={"Dummy": "test string"})
    manager = Manager(registry, fixture_config(), lease_ttl=DAY)
    lease = await manager.acquire_lease(attrs)
    renewed = await manager.renew_lease(lease)
    (stored,), _ = await registry.get_subnets()
    assert stored.attrs == attrs and abs(stored.expiration - (time.time() + DAY)) < 10
    assert abs(renewed.expiration - (time.time() + DAY)) < 10
    raw = await registry.client.get(registry.subnet_key(lease.subnet, None))
    assert (
        raw.value
        == b'{"PublicIP":"1.2.3.4","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"Dummy":"test string"}}'
    )


async def test_upstream_written_leases_are_read(registry):
    """Values as upstream flanneld writes them (pkg/subnet/etcd/registry.go, the LeaseAttrs JSON), including dual
    stack and vxlan BackendData."""
    await put_raw(
        registry,
        "10.5.52.0-24",
        '{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}',
        60,
    )
    await put_raw(
        registry,
        "10.12.13.0-24&fd00:12:13::-56",
        '{"PublicIP":"10.0.0.5","PublicIPv6":"fc00::1",'
        '"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"},'
        '"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:00"}}',
        60,
    )
    leases = {str(lease.subnet): lease for lease in (await registry.get_subnets())[0]}
    vxlan = leases["10.5.52.0/24"]
    assert vxlan.attrs.backend_type == "vxlan" and vxlan.attrs.backend_data == {
        "VNI": 1,
        "VtepMAC": "c6:d2:32:6f:8f:44",
    }
    dual = leases["10.12.13.0/24"]
    assert dual.ipv6_subnet == net("fd00:12:13::/56") and dual.attrs.public_ipv6 == ip("fc00::1")
    assert dual.attrs.backend_v6_data["VtepMAC"] == "aa:bb:cc:dd:ee:00"


async def test_malformed_keys_and_values_are_skipped_with_a_warning(registry, caplog):
    watch = registry.watch_subnets()
    await next_result(watch)
    for key, value in [
        ("garbage", "{}"),
        ("10.5.1.0-24", "not json"),
        ("10.5.2.0-24", '{"PublicIP":"2001:db8::1"}'),
        ("10.5.3.0-24", '{"PublicIP":""}'),
        ("255.255.255.255-32", "{}"),
        ("10.5.4.0-24", "[1,2]"),
    ]:
        await put_raw(registry, key, value, 60)
    await put_raw(registry, "10.5.9.0-24", '{"PublicIP":"192.168.0.1"}', 60)
    with caplog.at_level(logging.WARNING):
        events = await next_events(watch)
        assert [e.subnet for e in events.events] == [net("10.5.9.0/24")]
        leases, _ = await registry.get_subnets()
    assert [lease.subnet for lease in leases] == [net("10.5.9.0/24")]
    assert "Ignoring bad subnet node" in caplog.text
    await watch.aclose()


async def test_reservation_without_ttl_stays_a_reservation(registry):
    await put_raw(registry, "10.3.7.0-24", '{"PublicIP":"1.2.3.4","PublicIPv6":null}', None)
    manager = Manager(registry, fixture_config())
    lease = await manager.acquire_lease(LeaseAttrs(ip("1.2.3.4")))
    assert lease.subnet == net("10.3.7.0/24") and lease.expiration is None
    raw = await registry.client.get(registry.subnet_key(lease.subnet, None))
    assert raw.lease == 0  # upstream would have attached a 24 h lease (flannel#1329)
    await manager.renew_lease(lease)
    assert (await registry.client.get(registry.subnet_key(lease.subnet, None))).lease == 0


async def test_a_watch_catching_up_takes_events_in_batches_and_ends_with_the_stores_set(registry):
    """A watch that starts behind (a node that was busy, or resumes after an outage) is handed the missed changes as
    etcd sends them, many per result rather than one by one, and ends with exactly the store's leases."""
    start = await etcd_revision(registry)
    for third in range(40):
        await registry.create_subnet(net(f"10.7.{third}.0/24"), None, LeaseAttrs(ip(f"1.1.1.{third + 1}")), DAY)
    for third in range(0, 40, 4):
        await registry.delete_subnet(net(f"10.7.{third}.0/24"), None)
    end = await etcd_revision(registry)
    watcher = LeaseWatcher(net("10.7.255.0/24"))
    watch = registry.watch_subnets(since=start)
    sizes, seen = [], start
    while seen < end:
        result = await next_events(watch)
        sizes.append(len(result.events))
        seen = result.revision
        watcher.apply(result)
    await watch.aclose()
    assert sum(sizes) == 50 and max(sizes) > 1, sizes
    stored, _ = await registry.get_subnets(expirations=False)  # as a watch reports them: no TTL asked
    assert watcher.leases == {lease.subnet: lease for lease in stored} and len(stored) == 30


async def compact_after_bumps(registry):
    for i in range(5):
        await registry.client.put(registry.config_key.encode() + b"-bump", str(i).encode())
    revision = await etcd_revision(registry)
    await registry.client.compact(revision)
    return revision


async def test_watch_recovers_from_compaction_with_a_snapshot(registry):
    """TestWatchSubnetsRecoversFromCompaction: a watch from a compacted revision re-lists, then follows live."""
    await registry.create_subnet(net("10.1.5.0/24"), None, LeaseAttrs(ip("1.2.3.4")), DAY)
    await compact_after_bumps(registry)
    watch = registry.watch_subnets(since=1)
    snapshot = await next_result(watch)
    assert isinstance(snapshot, Snapshot) and [lease.subnet for lease in snapshot.leases] == [net("10.1.5.0/24")]
    await registry.create_subnet(net("10.1.6.0/24"), None, LeaseAttrs(ip("1.2.3.5")), DAY)
    assert [e.subnet for e in (await next_events(watch)).events] == [net("10.1.6.0/24")]
    await watch.aclose()


async def test_removal_hidden_by_compaction_is_still_reported(registry):
    """TestWatchSubnetReportsRemovalAfterCompaction: the re-list diff turns the vanished lease into a removal."""
    await registry.create_subnet(net("10.1.5.0/24"), None, LeaseAttrs(ip("1.2.3.4")), DAY)
    watcher = LeaseWatcher(net("10.1.1.0/24"))
    snapshot_watch = registry.watch_subnets()
    watcher.apply(await next_result(snapshot_watch))
    await snapshot_watch.aclose()
    await registry.delete_subnet(net("10.1.5.0/24"), None)
    await compact_after_bumps(registry)
    watch = registry.watch_subnets(since=1)
    batch = watcher.apply(await next_result(watch))
    assert [(e.type, e.subnet) for e in batch] == [(EventType.REMOVED, net("10.1.5.0/24"))]
    await watch.aclose()


async def test_watch_survives_an_etcd_restart_and_reports_what_changed_meanwhile(caplog):
    """etcd stops and returns: the watch says so once, resumes, and a lease added meanwhile shows within 2 s."""
    with EtcdCluster() as cluster:
        registry = EtcdRegistry(EtcdOptions(endpoints=cluster.endpoints))
        other = EtcdRegistry(EtcdOptions(endpoints=cluster.endpoints))
        try:
            watch = registry.watch_subnets()
            await next_result(watch)
            pending = asyncio.ensure_future(watch.__anext__())
            with caplog.at_level(logging.INFO):
                member = cluster.members[0]
                cluster.stop(member)
                await asyncio.sleep(2.5)  # long enough for the watch to back off several times
                cluster.start(member)
                for _ in range(50):  # etcd may say it serves a moment before it accepts connections
                    try:
                        await other.create_subnet(net("10.1.6.0/24"), None, LeaseAttrs(ip("1.2.3.5")), DAY)
                        break
                    except StoreUnavailable:
                        await asyncio.sleep(0.1)
                result = await asyncio.wait_for(pending, 2.0)  # the lease written after the return, within 2 s
            assert [e.subnet for e in result.events] == [net("10.1.6.0/24")]
            assert caplog.text.count("Lost the etcd watch") == 1 and "reachable again" in caplog.text
            await watch.aclose()
        finally:
            await registry.close()
            await other.close()


async def test_three_member_cluster_survives_losing_the_member_in_use():
    with EtcdCluster(hosts=["127.0.0.1"] * 3) as cluster:
        registry = EtcdRegistry(EtcdOptions(endpoints=cluster.endpoints))
        try:
            watch = registry.watch_subnets()
            await next_result(watch)
            cluster.stop(cluster.members[0], kill=True)  # pick_first was using the first endpoint
            await asyncio.sleep(0.5)
            for _ in range(20):  # a new leader may take an election timeout
                try:
                    await registry.create_subnet(net("10.1.7.0/24"), None, LeaseAttrs(ip("1.2.3.6")), DAY)
                    break
                except StoreError:  # unavailable until the members elect a new leader
                    await asyncio.sleep(0.25)
            assert [e.subnet for e in (await next_events(watch, timeout=5)).events] == [net("10.1.7.0/24")]
            await watch.aclose()
        finally:
            await registry.close()


async def test_an_etcd_slow_to_answer_its_handshake_is_still_reached(etcd):
    """An etcd far away or busy (1,000 nodes connecting at once) answers a connection's HTTP/2 handshake late: the
    client must wait for it rather than abandon the attempt and start over (with gRPC's minimum connect timeout at
    100 ms it never connected). Here a proxy holds every new connection for 1.5 s before passing it to etcd."""
    host, port = etcd.endpoints.split(",")[0].removeprefix("http://").rsplit(":", 1)
    pipes: set[asyncio.Task] = set()

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def slow_accept(client_reader, client_writer):
        await asyncio.sleep(1.5)
        server_reader, server_writer = await asyncio.open_connection(host, int(port))
        for task in (pipe(client_reader, server_writer), pipe(server_reader, client_writer)):
            pipes.add(asyncio.ensure_future(task))

    proxy = await asyncio.start_server(slow_accept, "127.0.0.1", 0)
    registry = EtcdRegistry(
        EtcdOptions(
            endpoints=f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}",
            prefix=f"/test-{secrets.token_hex(4)}/network",
        )
    )
    try:
        await registry.create_subnet(net("10.1.8.0/24"), None, LeaseAttrs(ip("1.2.3.7")), DAY)
        leases, _ = await registry.get_subnets()
        assert [lease.subnet for lease in leases] == [net("10.1.8.0/24")]
    finally:
        await registry.close()
        proxy.close()
        for task in pipes:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        await proxy.wait_closed()


def test_config_not_found_text_is_upstreams():
    assert CONFIG_NOT_FOUND == "flannel config not found in etcd store. Did you create your config using etcdv3 API?"
    assert json.loads(LeaseAttrs(ip("1.2.3.4")).to_json()) == {"PublicIP": "1.2.3.4", "PublicIPv6": None}


ACQUIRE = """
import asyncio, ipaddress, sys, time
from flannel_udp.subnet.config import load_config
from flannel_udp.subnet.etcd.client import EtcdOptions
from flannel_udp.subnet.etcd.registry import EtcdRegistry
from flannel_udp.subnet.lease import LeaseAttrs
from flannel_udp.subnet.manager import Manager

async def main():
    reg = EtcdRegistry(EtcdOptions(endpoints=sys.argv[1], prefix=sys.argv[2]))
    cfg = load_config('{"Network": "10.5.0.0/16", "SubnetLen": 20}')  # 15 subnets
    await reg.get_subnets()  # connected before the common start
    while time.time() < float(sys.argv[4]):
        await asyncio.sleep(0.001)
    lease = await Manager(reg, cfg).acquire_lease(LeaseAttrs(ipaddress.IPv4Address(sys.argv[3])))
    print(lease.subnet)
    await reg.close()

asyncio.run(main())
"""


def test_twelve_processes_acquiring_at_once_on_etcd_get_distinct_subnets(etcd):
    """Public IPs 15 apart share their home subnet (the IP modulo the 15 subnets): every start collides at first."""
    import subprocess
    import sys

    prefix = f"/test-{secrets.token_hex(4)}/network"
    start_at = str(time.time() + 3)
    procs = [
        subprocess.Popen(
            [sys.executable, "-P", "-c", ACQUIRE, etcd.endpoints, prefix, f"198.18.0.{1 + 15 * i}", start_at],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(12)
    ]
    results = [p.communicate(timeout=90) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    subnets = [out.strip() for out, _ in results]
    assert len(set(subnets)) == 12, subnets
