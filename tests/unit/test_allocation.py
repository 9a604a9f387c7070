"""Upstream etcd subnet_test.go (TestAcquireLease, TestConfigChanged) against the real embedded store, and
LeaseWatcher."""

import asyncio
import ipaddress

import pytest

from flannel_udp.subnet.allocation import decide
from flannel_udp.subnet.config import load_config
from flannel_udp.subnet.lease import EventType, Lease, LeaseAdded, LeaseAttrs, LeaseRemoved, Snapshot
from flannel_udp.subnet.local.registry import LocalRegistry
from flannel_udp.subnet.manager import Manager
from flannel_udp.subnet.registry import StoreUnavailable
from flannel_udp.subnet.watcher import LeaseRevoked, LeaseStream, LeaseWatcher
from testbed.stores import put_raw

net = ipaddress.ip_network
ip = ipaddress.IPv4Address
CONFIG = load_config('{ "Network": "10.3.0.0/16", "SubnetMin": "10.3.1.0", "SubnetMax": "10.3.25.0" }')
OTHER = LeaseAttrs(ip("1.1.1.1"))
OURS = LeaseAttrs(ip("1.2.3.4"))


@pytest.fixture
async def registry(tmp_path):
    reg = LocalRegistry.open_sync(str(tmp_path / "leases.db"), poll_interval=0.05)
    for subnet in ("10.3.1.0/24", "10.3.2.0/24", "10.3.4.0/24", "10.3.5.0/24", "10.3.31.0/24"):
        await reg.create_subnet(net(subnet), None, OTHER, 3600)
    yield reg
    await reg.close()


async def test_acquire_lease(registry):
    lease = await Manager(registry, CONFIG).acquire_lease(OURS)
    free = {net(f"10.3.{i}.0/24") for i in [3] + list(range(6, 26))}
    assert len(free) == 21 and lease.subnet in free
    again = await Manager(registry, CONFIG).acquire_lease(OURS)
    assert again.subnet == lease.subnet


async def test_previous_subnet_is_used_when_free_and_compatible(registry):
    lease = await Manager(registry, CONFIG, previous=(net("10.3.6.0/24"), None)).acquire_lease(OURS)
    assert lease.subnet == net("10.3.6.0/24")


async def test_incompatible_previous_subnet_is_not_used(registry):
    lease = await Manager(registry, CONFIG, previous=(net("10.4.1.0/24"), None)).acquire_lease(OURS)
    assert lease.subnet != net("10.4.1.0/24") and lease.subnet.subnet_of(net("10.3.0.0/16"))


async def test_config_changed_deletes_the_old_lease(registry):
    old = await Manager(registry, CONFIG).acquire_lease(OURS)
    new = await Manager(registry, load_config('{ "Network": "10.4.0.0/16" }')).acquire_lease(OURS)
    assert new.subnet.subnet_of(net("10.4.0.0/16"))
    keys = {lease.subnet for lease in (await registry.get_subnets())[0]}
    assert old.subnet not in keys and new.subnet in keys


async def test_exhausted_network_says_out_of_subnets(tmp_path):
    reg = LocalRegistry.open_sync(str(tmp_path / "l.db"))
    cfg = load_config('{"Network": "10.5.0.0/28"}')  # 3 subnets
    try:
        for i in range(3):
            await Manager(reg, cfg).acquire_lease(LeaseAttrs(ip(f"198.18.0.{i + 1}")))
        with pytest.raises(RuntimeError, match="out of subnets"):
            await Manager(reg, cfg).acquire_lease(LeaseAttrs(ip("198.18.0.9")))
    finally:
        await reg.close()


async def test_reservation_without_ttl_is_honoured(registry):
    await registry.update_subnet(net("10.3.20.0/24"), None, OURS, None)  # a reservation: no expiry
    lease = await Manager(registry, CONFIG).acquire_lease(OURS)
    assert lease.subnet == net("10.3.20.0/24") and lease.expiration is None
    renewed = await Manager(registry, CONFIG).renew_lease(lease)
    assert renewed.expiration is None


async def test_watch_reports_added_and_expired(registry):
    seen = []

    async def watch():
        async for result in registry.watch_subnets():
            seen.append(result)
            if len(seen) == 3:
                return

    task = asyncio.create_task(watch())
    for _ in range(500):  # the watch has its snapshot before the change it must see
        if seen:
            break
        await asyncio.sleep(0.01)
    await registry.create_subnet(net("10.3.30.0/24"), None, OTHER, ttl=0.5)
    await asyncio.wait_for(task, 5)
    assert isinstance(seen[0], Snapshot) and len(seen[0].leases) == 5
    assert [(e.type, str(e.subnet)) for e in seen[1].events] == [(EventType.ADDED, "10.3.30.0/24")]
    assert [(e.type, str(e.subnet)) for e in seen[2].events] == [(EventType.REMOVED, "10.3.30.0/24")]


async def test_bad_keys_and_values_in_the_store_are_skipped(registry):
    await put_raw(registry, "10.3.40.0-24", '{"PublicIP":""}', None)
    await put_raw(registry, "garbage", "{}", None)
    leases, _ = await registry.get_subnets()
    assert len(leases) == 5


def lease(subnet, public="1.1.1.1"):
    return Lease(net(subnet), LeaseAttrs(ip(public)))


def test_watcher_reset_and_update():
    w = LeaseWatcher(net("10.3.9.0/24"))
    batch = w.reset([lease("10.3.1.0/24"), lease("10.3.9.0/24"), lease("10.3.2.0/24")])
    assert sorted(str(e.subnet) for e in batch) == ["10.3.1.0/24", "10.3.2.0/24"]
    # Own lease never appears, a second reset produces only the difference, and changed attrs are re-announced.
    batch = w.reset([lease("10.3.1.0/24", "2.2.2.2"), lease("10.3.9.0/24"), lease("10.3.3.0/24")])
    assert sorted((e.type.value, str(e.subnet)) for e in batch) == [
        ("added", "10.3.1.0/24"),
        ("added", "10.3.3.0/24"),
        ("removed", "10.3.2.0/24"),
    ]
    batch = w.update(
        [
            LeaseAdded(lease("10.3.9.0/24")),
            LeaseRemoved(net("10.3.3.0/24")),
        ]
    )
    assert batch == [LeaseRemoved(net("10.3.3.0/24"))]  # the own lease is not reported; a removal is its key


def test_simultaneous_starts_spread_over_the_whole_range():
    """Nodes that start together all see the same listing; upstream's pick among the first 100 free subnets gives
    them at most 100 distinct choices (N/100 collisions each). Ours, once a node's home subnet is taken (here the
    same home for all: public IPs 1,023 apart), is uniform over every free subnet."""
    import random

    cfg = load_config('{"Network": "10.100.0.0/16", "SubnetLen": 26}')  # 1,023 subnets, the first 10.100.0.64/26
    taken = [Lease(net(f"10.100.{i}.0/26"), OTHER) for i in range(1, 200)]  # some already leased
    base = int(ip("198.18.0.0"))
    home_taken = base + (3 - base) % 1023  # ordinal 3: 10.100.1.0/26
    rng = random.Random(7)
    picks = [decide(cfg, taken, ip(home_taken + 1023 * k), rng=rng).subnet for k in range(200)]
    assert all(p.prefixlen == 26 and cfg.subnet_min <= p.network_address <= cfg.subnet_max for p in picks)
    assert not {p for p in picks} & {lease.subnet for lease in taken}
    assert len(set(picks)) > 160  # ~181 expected from 824 free; upstream's way: at most 100


def test_nodes_numbered_consecutively_start_together_without_colliding_and_return_to_their_subnet():
    """1,000 nodes with consecutive public IPs (one underlay, as clusters number their nodes) decide on the same empty
    listing of a range with 1,023 subnets: each takes its home, so none collides (uniform draws would give ~640
    distinct subnets); a node deciding again once its lease is gone gets the same subnet back."""
    import random

    cfg = load_config('{"Network": "10.100.0.0/16", "SubnetLen": 26}')
    first = int(ip("198.18.0.1"))
    picks = [decide(cfg, [], ip(first + i), rng=random.Random(i)).subnet for i in range(1000)]
    assert len(set(picks)) == 1000
    others = [Lease(subnet, OTHER) for subnet in picks[1:]]
    assert decide(cfg, others, ip(first), rng=random.Random(99)).subnet == picks[0]


def test_a_nearly_full_range_still_finds_its_last_free_subnet():
    import random

    cfg = load_config('{"Network": "10.100.0.0/16", "SubnetLen": 26}')
    last_free = net("10.100.77.128/26")
    taken = [Lease(s, OTHER) for s in net("10.100.0.0/16").subnets(new_prefix=26) if s != last_free]
    assert decide(cfg, taken, ip("198.18.1.1"), rng=random.Random(1)).subnet == last_free


async def test_a_dual_stack_node_gives_way_when_another_took_its_ipv4_subnet_with_another_ipv6_one(tmp_path):
    """Dual-stack keys carry both subnets, so two nodes creating `A&X` and `A&Y` at once both succeed in the store;
    the one that finds the other gives its lease back and picks again."""
    cfg = load_config('{"Network": "10.3.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:1::/56"}')

    class Racing(LocalRegistry):
        raced = False

        async def create_subnet(self, subnet, ipv6_subnet, attrs, ttl):
            if not self.raced:  # another node creates the same IPv4 subnet with another IPv6 one, just before us
                self.raced = True
                other6 = next(
                    s
                    for s in net("fd00:1::/56").subnets(new_prefix=64)
                    if s != ipv6_subnet and s.network_address >= cfg.ipv6_subnet_min
                )
                await super().create_subnet(subnet, other6, OTHER, 3600)
            return await super().create_subnet(subnet, ipv6_subnet, attrs, ttl)

    reg = Racing.open_sync(str(tmp_path / "leases.db"))
    try:
        lease = await Manager(reg, cfg).acquire_lease(LeaseAttrs(ip("1.2.3.4"), ipaddress.IPv6Address("fd00::4")))
        leases, _ = await reg.get_subnets()
        assert [lease.subnet for lease in leases].count(lease.subnet) == 1, leases
        assert [x.ipv6_subnet for x in leases].count(lease.ipv6_subnet) == 1
    finally:
        await reg.close()


async def test_a_create_whose_answer_was_lost_is_still_this_starts_own_lease(tmp_path):
    """Under load a create can succeed in the store while its answer times out: the next attempt finds the lease by
    public IP. It is this start's own, so a failed start gives it back (an old lease found at start stays)."""

    class LostAnswer(LocalRegistry):
        async def create_subnet(self, subnet, ipv6_subnet, attrs, ttl):
            expiration = await super().create_subnet(subnet, ipv6_subnet, attrs, ttl)
            if not getattr(self, "answered", False):
                self.answered = True
                raise StoreUnavailable("the answer timed out")
            return expiration

    reg = LostAnswer.open_sync(str(tmp_path / "leases.db"))
    try:
        manager = Manager(reg, CONFIG)
        lease = await manager.acquire_lease(OURS)
        assert [x.subnet for x in (await reg.get_subnets())[0]] == [lease.subnet]
        assert await manager.release_created_lease() == lease
        assert (await reg.get_subnets())[0] == []
        # A lease that was there before this start is reused and kept.
        await reg.create_subnet(lease.subnet, None, OURS, 3600)
        restarted = Manager(reg, CONFIG)
        assert (await restarted.acquire_lease(OURS)).subnet == lease.subnet
        assert await restarted.release_created_lease() is None
        assert [x.subnet for x in (await reg.get_subnets())[0]] == [lease.subnet]
    finally:
        await reg.close()


def test_a_removal_keeps_the_ipv6_subnet_of_the_lease_it_ends():
    w = LeaseWatcher(net("10.3.9.0/24"))
    w.reset([Lease(net("10.3.1.0/24"), OTHER, net("fd00:3:0:1::/64"))])
    assert w.update([LeaseRemoved(net("10.3.1.0/24"))]) == [LeaseRemoved(net("10.3.1.0/24"), net("fd00:3:0:1::/64"))]


async def test_lease_stream_gives_peer_batches_and_ends_when_the_own_lease_is_revoked(registry):
    manager = Manager(registry, CONFIG)
    own = await manager.acquire_lease(OURS)
    stream = LeaseStream(manager, own)
    batches = []
    with pytest.raises(LeaseRevoked):
        async for batch in stream.batches():
            batches.append(batch)
            if len(batches) == 1:
                await registry.create_subnet(net("10.3.30.0/24"), None, OTHER, 3600)
            elif len(batches) == 2:
                await registry.delete_subnet(own.subnet, None)
    assert len(batches[0]) == 5 and own.subnet not in [e.subnet for e in batches[0]]
    assert batches[1] == [LeaseAdded(Lease(net("10.3.30.0/24"), OTHER, None, batches[1][0].lease.expiration))]


IPV6_ONLY = load_config('{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:10:244::/60"}')
HOST6 = ipaddress.IPv6Address("fd00:198:18::3")


def lease6(subnet: str, public6: str) -> Lease:
    return Lease(None, LeaseAttrs(ipaddress.IPv4Address(0), ipaddress.IPv6Address(public6), "udp"), net(subnet))


def test_ipv6_only_allocation_takes_the_home_subnet_then_finds_its_own_again():
    decision = decide(IPV6_ONLY, [], HOST6)
    # 15 subnets from fd00:10:244:1::/64; the home's ordinal is the PublicIPv6 modulo 15 (13).
    assert decision.subnet is None and decision.ipv6_subnet == net("fd00:10:244:e::/64")
    mine = lease6("fd00:10:244:9::/64", str(HOST6))
    again = decide(IPV6_ONLY, [lease6("fd00:10:244:e::/64", "fd00:198:18::8"), mine], HOST6)
    assert again.reuse is mine and again.ipv6_subnet == mine.ipv6_subnet
    taken = decide(IPV6_ONLY, [lease6("fd00:10:244:e::/64", "fd00:198:18::8")], HOST6)
    assert taken.ipv6_subnet not in (None, net("fd00:10:244:e::/64"))


def test_ipv6_only_allocation_prefers_the_previous_subnet_and_never_takes_a_dual_stack_lease_as_its_own():
    previous = (None, net("fd00:10:244:c::/64"))
    assert decide(IPV6_ONLY, [], HOST6, previous).ipv6_subnet == net("fd00:10:244:c::/64")
    dual = Lease(net("10.3.1.0/24"), LeaseAttrs(ip("1.1.1.1"), HOST6, "udp"), net("fd00:10:244:e::/64"))
    decision = decide(IPV6_ONLY, [dual], HOST6)
    assert decision.reuse is None and decision.ipv6_subnet != net("fd00:10:244:e::/64")


async def test_ipv6_only_leases_in_the_embedded_store_and_the_watcher(registry):
    ours = LeaseAttrs(ipaddress.IPv4Address(0), HOST6, "udp")
    lease = await Manager(registry, IPV6_ONLY).acquire_lease(ours)
    assert lease.subnet is None and lease.key == f"{lease.ipv6_subnet.network_address}-64"
    other = await Manager(registry, IPV6_ONLY).acquire_lease(LeaseAttrs(ipaddress.IPv4Address(0), HOST6 + 1, "udp"))
    watcher = LeaseWatcher(lease.primary)
    snapshot, _ = await registry.get_subnets()
    added = [e for e in watcher.reset(snapshot) if e.primary.version == 6]
    assert [e.lease for e in added] == [other]  # keyed by the IPv6 subnet; its own lease is never reported
    assert watcher.update([LeaseRemoved(None, other.ipv6_subnet)]) == [LeaseRemoved(None, other.ipv6_subnet)]
