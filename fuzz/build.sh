#!/usr/bin/env bash
# Builds the Cython data plane (_fastpath) a second time, with clang's coverage instrumentation for libFuzzer (edge
# counters, their PC table, comparison tracing: what atheris's libFuzzer reads), into
# fuzz/.build: `python -m fuzz` puts it first on sys.path, so the fuzzer is guided by the C code's edges too.
# Needs clang (Debian: apt-get install clang). The regular build in _fastpath/ is untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=fuzz/.build
# setup.py runs here directly, outside pip's isolated build environment: it needs the build requirement itself.
"$python" -c "import Cython" 2>/dev/null || "$python" -m pip install -q "Cython>=3.0"
rm -rf "$out"
CC=clang LDSHARED="clang -shared" CFLAGS="-fsanitize-coverage=inline-8bit-counters,pc-table,trace-cmp -g" \
  "$python" setup.py -q build_ext --build-lib "$out" --build-temp "$out/tmp" >/dev/null
cp _fastpath/__init__.py "$out/_fastpath/"
# clang's libFuzzer as a shared library: python -m fuzz loads it before atheris (see fuzz/__main__.py).
clang++ -shared -o "$out/libfuzzer.so" -Wl,--whole-archive \
  "$(clang -print-resource-dir)/lib/linux/libclang_rt.fuzzer_no_main-x86_64.a" -Wl,--no-whole-archive -lpthread
echo "instrumented _fastpath in $out: $(ls "$out"/_fastpath/*.so | wc -l) modules"
