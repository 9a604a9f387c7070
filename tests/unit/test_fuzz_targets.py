"""A short run of every fuzz target (python -m fuzz) from its seed corpus in fuzz/corpus: any finding fails the suite.
Long runs are `python -m fuzz TARGET -max_total_time=SECONDS` (figures in the README)."""

import os
import subprocess
import sys

import pytest

from fuzz.targets import NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("target", NAMES)
def test_fuzz_target_finds_nothing_in_a_short_run(target, tmp_path):
    # New finds go to tmp_path (the first corpus directory); the kept seed corpus is only read.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz",
            target,
            "-max_total_time=4",
            "-timeout=10",
            f"-artifact_prefix={tmp_path}/",
            str(tmp_path),
            os.path.join(ROOT, "fuzz", "corpus", target),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done" in r.stderr
    if target == "pump":
        # The data plane's C code is instrumented (fuzz/build.sh, run by scripts/setup.sh): its edges guide the run.
        # Five modules carry counters: pump, tun, udp, packet, routes (offload's functions are inlined into them).
        assert "Loaded 5 modules" in r.stderr, r.stderr[:2000]
