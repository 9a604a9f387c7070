"""Real processes sharing one lease file: simultaneous acquisitions never share a subnet; lost races are retried."""

import subprocess
import sys
import time

ACQUIRE = """
import asyncio, ipaddress, sys, time
from flannel_udp.subnet.config import load_config
from flannel_udp.subnet.lease import LeaseAttrs
from flannel_udp.subnet.local.registry import LocalRegistry
from flannel_udp.subnet.manager import Manager

async def main():
    reg = LocalRegistry.open_sync(sys.argv[1])
    cfg = load_config('{"Network": "10.5.0.0/16", "SubnetLen": 20}')  # 15 subnets
    while time.time() < float(sys.argv[3]):
        time.sleep(0.001)
    lease = await Manager(reg, cfg).acquire_lease(LeaseAttrs(ipaddress.IPv4Address(sys.argv[2])))
    print(lease.subnet)
    await reg.close()

asyncio.run(main())
"""


def test_eight_processes_acquiring_at_once_get_distinct_subnets(tmp_path):
    """Public IPs 15 apart share their home subnet (the IP modulo the 15 subnets): every start collides at first."""
    lease_file = str(tmp_path / "leases.db")
    start_at = str(time.time() + 1.5)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ACQUIRE, lease_file, f"198.18.0.{1 + 15 * i}", start_at],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(10)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    subnets = [out.strip() for out, _ in results]
    assert len(set(subnets)) == 10, subnets


OPEN = """
import sys, time
from flannel_udp.subnet.local.registry import LocalRegistry
while time.time() < float(sys.argv[2]):
    pass
LocalRegistry.open_sync(sys.argv[1])
"""


def test_nodes_creating_the_lease_file_together_all_start(tmp_path):
    """Seen once in the benchmarks (two nodes making a new lease file at the same instant, one failed with "database
    is locked": switching to WAL may refuse at once instead of waiting on the busy timeout, so opening now retries it).
    The race is rare; this guards the start-together case: twelve processes open a fresh file at once, 5 times."""
    for attempt in range(5):
        lease_file = str(tmp_path / f"leases-{attempt}.db")
        start_at = str(time.time() + 1.0)
        procs = [
            subprocess.Popen([sys.executable, "-c", OPEN, lease_file, start_at], stderr=subprocess.PIPE, text=True)
            for _ in range(12)
        ]
        errors = [p.communicate(timeout=60)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), errors


class TrimmedBetweenReads:
    """A connection on which another writer trims the event log right after the watch's first read."""

    def __init__(self, db, trim):
        self.db, self.trim = db, trim

    def execute(self, sql, *args):
        result = self.db.execute(sql, *args)
        if "MIN(rev)" in sql:
            self.trim()
        return result


def test_a_trim_between_a_polls_reads_never_skips_events_unseen(tmp_path, monkeypatch):
    """The poll reads the oldest event kept, then the events after the watcher's revision: a trim committed between
    the two must not make events vanish (the poll sees the log before or after the trim, never half of each)."""
    import ipaddress
    import sqlite3

    from flannel_udp.subnet.local import registry as local_store

    monkeypatch.setattr(local_store, "EVENTS_KEPT", 2)
    path = str(tmp_path / "leases.db")
    store = local_store.LocalRegistry.open_sync(path)
    store._executor.submit(store._put, "10.5.1.0-24", '{"PublicIP":"198.18.0.1"}', None).result()
    revision = store._executor.submit(lambda: store._revision(store._connection())).result()
    for i in range(2, 4):  # two more events: the log still holds the one after `revision`
        store._executor.submit(store._put, f"10.5.{i}.0-24", '{"PublicIP":"198.18.0.1"}', None).result()

    def trim_behind_the_watcher():  # a third writer's put trims the event after `revision` away
        store._executor.submit(store._put, "10.5.9.0-24", '{"PublicIP":"198.18.0.1"}', None).result()

    reader = sqlite3.connect(path, isolation_level=None)
    events = local_store.LocalRegistry._events_since(TrimmedBetweenReads(reader, trim_behind_the_watcher), revision)
    assert events is not None  # the log reached back far enough when the poll began...
    assert [e.lease.subnet for e in events.events] == [ipaddress.ip_network(f"10.5.{i}.0/24") for i in (2, 3)]
    assert events.revision == revision + 2  # ...so it reads exactly what followed `revision` then, nothing skipped
    reader.close()
    store._executor.submit(store._close).result()
