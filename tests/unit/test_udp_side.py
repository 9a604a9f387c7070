"""How the UDP side groups a batch into sendmmsg messages: each run of datagrams one UDP GSO send may carry."""

import pytest
from _fastpath.udp import gso_runs


@pytest.mark.parametrize(
    "lengths, peers, runs",
    [
        ([1000] * 5, [0] * 5, [(0, 5)]),
        ([1000] * 4, [0, 0, 1, 1], [(0, 2), (2, 4)]),  # one peer per message
        ([1000, 1000, 500, 1000], [0] * 4, [(0, 3), (3, 4)]),  # a shorter datagram ends its run
        ([500, 1000, 1000], [0] * 3, [(0, 1), (1, 3)]),  # a longer one starts a new run
        ([100] * 65, [0] * 65, None),  # more than a batch's 64 slots: refused
        ([100] * 64, [0] * 64, [(0, 64)]),  # the kernel's 64-segment limit
        ([1400] * 50, [0] * 50, [(0, 46), (46, 50)]),  # 46 x 1400 = 64,400 bytes; a 47th passes 65,000
        ([40], [3], [(0, 1)]),
        ([], [], []),
    ],
)
def test_runs(lengths, peers, runs):
    if runs is None:
        with pytest.raises(ValueError):
            gso_runs(lengths, peers)
        return
    assert gso_runs(lengths, peers) == runs


def test_without_gso_every_datagram_is_its_own_message():
    assert gso_runs([1000] * 3, [0] * 3, gso=False) == [(0, 1), (1, 2), (2, 3)]
