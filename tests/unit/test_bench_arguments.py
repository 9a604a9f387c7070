"""Every benchmark command refuses a mistyped backend, variant or node flag in one line, exit status 1, before it
builds anything."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "command, named",
    [
        (["bench", "--backends", "udp@-no-such-flag"], "-no-such-flag"),
        (["bench", "--backends", "vxlan,udpp"], "'udpp'"),
        (["bench", "--backends", "udp@-udp-priority=300", "--quick"], "-udp-priority must be from 0 to 99"),
        (["bench", "--backends", "udp@-udp-offload=maybe"], "invalid boolean value 'maybe' for -udp-offload"),
        (["bench", "--backends", "udp@cpus=first"], "cpus=first: a CPU list"),
        (["bench", "--backends", "udp@-udp-workers=300"], "-udp-workers must be from 0 to 256"),
        (["bench.latency", "--backends", "vxlan,udp@-no-such-flag"], "-no-such-flag"),
        (["bench.latency", "--backends", "vxlan,limit-c@rt=100"], "limit-c takes one @rt=PRIORITY"),
        (["bench.compare", "--variants", "vxlan,udp-fast"], "udp-fast"),
    ],
)
def test_a_mistyped_backend_is_one_line(command, named):
    result = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
