import pytest

from testbed.cluster import Testbed


@pytest.fixture
def bed():
    """A fresh 3-host cluster (no nodes started); always torn down."""
    with Testbed(hosts=3) as testbed:
        testbed.write_config({"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}})
        yield testbed


@pytest.fixture
def bed6():
    """Three hosts whose links carry IPv6 alone (an IPv6-only underlay); no config written."""
    with Testbed(hosts=3, ipv6_only=True) as testbed:
        yield testbed
