#!/usr/bin/env bash
# Installs what flannel-udp, its demo, its tests (etcd-server, containerd and runc among them) and its benchmarks need on
# Debian, as root, and builds the package (with its Cython data plane) into ./.venv, then builds the Go programs the
# tests start (scripts/build-go-servers.sh). The container image (scripts/build-image.sh, with mmdebstrap and umoci) is
# built when a test or the demo first needs it.
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(iproute2 iputils-ping iperf3 ethtool iptables nftables containernetworking-plugins
          tcpdump libpcap0.8 procps etcd-server openssl gcc clang libclang-rt-dev python3 python3-dev python3-venv sockperf
          containerd runc conntrack mmdebstrap umoci busybox-static wireguard-tools libssl-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> apt-get install ${missing[*]}"
    apt-get update -qq
    # No service of these packages is started on the machine (containerd's would be): the tests and the demo start
    # their own, inside namespaces. policy-rc.d is Debian's switch for that, left as found.
    ours=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && ours=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [ -n "$ours" ]; then rm -f /usr/sbin/policy-rc.d && trap - EXIT; fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    python3 -m venv .venv
fi
echo "==> pip install -e '.[test,bench]' (builds _fastpath)"
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -m pip install -q -e '.[test,bench]'
echo "==> fuzz/build.sh (the data plane again, with coverage instrumentation for the fuzzers)"
bash fuzz/build.sh

# The Kubernetes programs and upstream flanneld for the tests, demo and benchmarks (once per machine, cached outside
# the clone; a later run finds them and costs nothing).
bash scripts/build-go-servers.sh
# wireguard-go and boringtun, the WireGuard peers of the wireguard backend's tests and benchmarks (cached alike).
bash scripts/build-wireguard-peers.sh
