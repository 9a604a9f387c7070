#!/usr/bin/env bash
# Builds the two userspace WireGuard programs the wireguard backend is tested and benchmarked against: wireguard-go
# (from its Go module golang.zx2c4.com/wireguard) and boringtun (boringtun-cli from crates.io), each at one pinned
# release, once per machine, into the cache outside the clone. Both are configured with `wg` (Debian's
# wireguard-tools) over their UAPI sockets.
set -euo pipefail

WIREGUARD_GO_VERSION="${WIREGUARD_GO_VERSION:-v0.0.0-20260522210424-ecfc5a8d5446}"
BORINGTUN_VERSION="${BORINGTUN_VERSION:-0.7.1}"
CACHE="${FLANNEL_UDP_CACHE:-/var/cache/flannel-udp}"
GO="${GO:-/usr/local/go/bin/go}"
[ -x "$GO" ] || GO="$(command -v go || true)"

dest="$CACHE/wireguard-go-$WIREGUARD_GO_VERSION"
if [ ! -x "$dest/wireguard" ]; then
    echo "==> building wireguard-go $WIREGUARD_GO_VERSION into $dest, once per machine (about 1 min on 2 cores)"
    rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
    GOBIN="$dest.tmp" CGO_ENABLED=0 "$GO" install -trimpath -ldflags "-s -w" "golang.zx2c4.com/wireguard@$WIREGUARD_GO_VERSION"
    rm -rf "$dest" && mv "$dest.tmp" "$dest"
fi

dest="$CACHE/boringtun-$BORINGTUN_VERSION"
if [ ! -x "$dest/bin/boringtun-cli" ]; then
    CARGO="${CARGO:-$(command -v cargo || echo "$HOME/.cargo/bin/cargo")}"
    if [ ! -x "$CARGO" ]; then
        echo "error: cargo is needed to build boringtun-cli; install Rust (rustup) first" >&2
        exit 1
    fi
    echo "==> building boringtun-cli $BORINGTUN_VERSION into $dest, once per machine (about 2 min on 2 cores)"
    rm -rf "$dest.tmp"
    "$CARGO" install --quiet --locked --version "$BORINGTUN_VERSION" --root "$dest.tmp" boringtun-cli
    rm -rf "$dest" && mv "$dest.tmp" "$dest"
fi
