"""`python -m fuzz TARGET [libFuzzer flags]`: coverage-guided fuzzing (atheris, libFuzzer inside) of what parses bytes
from the network or the store. The corpus is fuzz/corpus/TARGET (kept in the repo; new finds are added to it unless
another corpus directory is given). Python code is instrumented by atheris; the Cython data plane is covered when
fuzz/build.sh has built it with clang's coverage instrumentation into fuzz/.build (used first when present).

    .venv/bin/python -m fuzz pump -max_total_time=600
    .venv/bin/python -m fuzz netconf -runs=100000
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
INSTRUMENTED = os.path.join(HERE, ".build")


def main() -> int:
    from .targets import NAMES

    if len(sys.argv) < 2 or sys.argv[1] not in NAMES:
        print(f"usage: python -m fuzz {{{'|'.join(NAMES)}}} [libFuzzer flags] [corpus dirs]", file=sys.stderr)
        return 2
    name, flags = sys.argv[1], sys.argv[2:]
    if os.path.isdir(os.path.join(INSTRUMENTED, "_fastpath")):
        sys.path.insert(0, INSTRUMENTED)  # before the regular build: its coverage counters guide the fuzzer
        # clang's libFuzzer, loaded with its symbols global before atheris and the instrumented extension: atheris
        # then drives it ("preloaded libfuzzer") and the extension's coverage callbacks resolve to it (Python loads
        # extension modules with RTLD_LOCAL, so they could not reach the copy inside atheris).
        ctypes.CDLL(os.path.join(INSTRUMENTED, "libfuzzer.so"), mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    import atheris

    with atheris.instrument_imports(include=["flannel_udp", "fuzz"]):
        target = importlib.import_module(f"fuzz.targets.{name}")
    if not any(not f.startswith("-") for f in flags):
        flags.append(os.path.join(HERE, "corpus", name))
    atheris.Setup([sys.argv[0], *flags], target.test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
