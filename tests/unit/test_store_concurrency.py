"""Real processes sharing one lease file: simultaneous acquisitions never share a subnet; lost races are retried."""

import subprocess
import sys
import time

ACQUIRE = """
import asyncio, ipaddress, sys, time
from flannel_udp.subnet.config import load_config
from flannel_udp.subnet.lease import LeaseAttrs
from flannel_udp.subnet.local_store import LocalRegistry
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
from flannel_udp.subnet.local_store import LocalRegistry
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
