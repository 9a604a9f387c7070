"""A lease as the store holds it (etcd key `<prefix>/subnets/<subnet key>` and its JSON value, written by any node,
upstream's or ours): it decodes to a lease whose subnet key round-trips, or to a LeaseError; nothing else."""

from __future__ import annotations

from flannel_udp.subnet.lease import LeaseError, lease_from_kv, make_subnet_key, parse_subnet_key


def test_one_input(data: bytes) -> None:
    key, _, value = data.partition(b"\n")  # the input: the key's last part, a newline, the value
    try:
        lease = lease_from_kv(key.decode("utf-8", "replace"), value, None)
    except LeaseError:
        return
    # The key we would write for this lease reads back as the same subnets.
    assert parse_subnet_key(make_subnet_key(lease.subnet, lease.ipv6_subnet)) == (lease.subnet, lease.ipv6_subnet)
    assert lease.attrs.public_ip is not None or lease.attrs.public_ipv6 is not None
