"""Every fuzz target (python -m fuzz) replays its kept corpus in fuzz/corpus, each input once and in the same order
every run: an input that once found a fault, or a seed, that fails again fails the suite. Finding new inputs is
`python -m fuzz TARGET -max_total_time=SECONDS` (docs/development.md), not the suite's job."""

import os
import subprocess
import sys

import pytest

from fuzz.targets import NAMES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("target", NAMES)
def test_fuzz_target_replays_its_corpus_cleanly(target, tmp_path):
    corpus = os.path.join(ROOT, "fuzz", "corpus", target)
    r = subprocess.run(
        [sys.executable, "-m", "fuzz", target, "-runs=0", "-timeout=10", f"-artifact_prefix={tmp_path}/", corpus],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    inputs = len(os.listdir(corpus))
    assert f"Done {inputs + 1} runs" in r.stderr, r.stderr[-2000:]  # every input, and the empty one libFuzzer adds
    if target == "pump":
        # The data plane's C code is instrumented (fuzz/build.sh, run by scripts/setup.sh): its edges count too.
        # Six modules carry counters: loop, pump, tun, udp, packet, routes (offload's functions are inlined into them).
        assert "Loaded 6 modules" in r.stderr, r.stderr[:2000]
