#!/usr/bin/env bash
# Builds the container image of the node agent from this repository, as an OCI archive:
#   bash scripts/build-image.sh [--tag TAG] [--output FILE]
# The root filesystem is made from Debian's packages by mmdebstrap (no base image is pulled from any registry):
# python3, iproute2, iptables and nftables, and flannel-udp with its compiled data plane in a venv at /opt/flannel-udp
# (commands: /opt/bin/flanneld, as upstream's image has it, and flannel-udp). The CNI plugin `flannel` runs on the host,
# which may have no Python, so the image also carries it as one executable made by PyInstaller from the same code
# (/flannel, as upstream's flannel-cni-plugin image), which the DaemonSet's init container copies to /opt/cni/bin.
# Two layers: Debian's packages, cached per machine under $FLANNEL_UDP_CACHE/image (the first build takes about
# two minutes), and flannel-udp (rebuilt every time, about a minute). umoci writes the OCI layout.
set -euo pipefail
cd "$(dirname "$0")/.."

version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' flannel_udp/__init__.py)"
tag="$version"
output=""
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag="$2"; shift 2 ;;
        --output) output="$2"; shift 2 ;;
        *) echo "error: unknown argument $1 (usage: build-image.sh [--tag TAG] [--output FILE])" >&2; exit 1 ;;
    esac
done
CACHE="${FLANNEL_UDP_CACHE:-/var/cache/flannel-udp}/image"
output="${output:-$CACHE/flannel-udp-$tag.oci.tar}"
for tool in mmdebstrap umoci; do
    command -v "$tool" >/dev/null || { echo "error: $tool is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
[ -x .venv/bin/pip ] || { echo "error: no .venv (run scripts/setup.sh first)" >&2; exit 1; }

codename="$(. /etc/os-release && echo "$VERSION_CODENAME")"
mirrors=("deb http://deb.debian.org/debian $codename main" "deb http://deb.debian.org/debian $codename-updates main"
         "deb http://deb.debian.org/debian-security $codename-security main")
# What the agent runs (and nothing to build with): the image's own layer of Debian packages.
runtime_packages="python3,iproute2,iptables,nftables"
# The venv and the CNI executable are made in a second root of the same Debian with the tools for that.
builder_packages="$runtime_packages,python3-venv,libpython3.11,binutils"
lean=(--variant=minbase --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*'
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' --skip=output/dev)

work="$(mktemp -d /tmp/flannel-udp-image.XXXXXX)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$CACHE"

# debian_root DIR PACKAGES: a Debian root filesystem in DIR, made once per machine and package list.
debian_root() {
    local dir="$1" packages="$2"
    if [ "$(cat "$dir.packages" 2>/dev/null)" != "$codename $packages" ]; then
        echo "==> mmdebstrap $codename ($packages) into $dir, once per machine"
        rm -rf "$dir" "$dir.packages"
        mmdebstrap --quiet "${lean[@]}" --include="$packages" "$codename" "$dir.tmp" "${mirrors[@]}"
        rm -rf "$dir.tmp"/var/lib/apt/lists/* "$dir.tmp"/var/cache/apt/* "$dir.tmp"/var/log/*
        mv "$dir.tmp" "$dir" && echo "$codename $packages" > "$dir.packages"
    fi
}
debian_root "$CACHE/runtime-root" "$runtime_packages"
debian_root "$CACHE/builder-root" "$builder_packages"

echo "==> wheels of flannel-udp (with its data plane), its dependencies and PyInstaller"
mkdir -p "$work/wheels"
.venv/bin/pip wheel --quiet --no-deps --wheel-dir "$work/wheels" .
.venv/bin/pip wheel --quiet --wheel-dir "$work/wheels" "$work"/wheels/flannel_udp-*.whl pyinstaller

echo "==> the venv at /opt/flannel-udp and the CNI executable, in a copy of the builder root"
cp -a "$CACHE/builder-root" "$work/builder"
mkdir -p "$work/builder/wheels" "$work/builder/build"
cat > "$work/builder/build/cni_main.py" <<'PY'
import sys

from flannel_udp.cni import main

sys.exit(main())
PY
cat > "$work/builder/build/inside.sh" <<'SH'
set -eu
python3 -m venv /opt/flannel-udp
/opt/flannel-udp/bin/pip install --quiet --no-index --find-links /wheels flannel-udp
# PyInstaller runs from a venv of its own that has flannel-udp too, so the image's venv never holds it.
python3 -m venv /build/venv
/build/venv/bin/pip install --quiet --no-index --find-links /wheels flannel-udp pyinstaller
cd /build
/build/venv/bin/pyinstaller --log-level WARN --onefile --name flannel --strip --distpath /build/dist cni_main.py
/opt/flannel-udp/bin/python -m pip uninstall --quiet --yes pip setuptools
find /opt/flannel-udp -name '*.so' -exec strip --strip-unneeded {} +
find /opt/flannel-udp -name '__pycache__' -prune -exec rm -rf {} +
/opt/flannel-udp/bin/python -m compileall -q /opt/flannel-udp/lib
SH
# The chroot's mounts live in a mount namespace of their own: they vanish with it, also on failure.
unshare --mount --propagation private sh -c '
    set -e
    root="$1"
    mount --bind "$2" "$root/wheels"
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root chroot "$root" /bin/sh /build/inside.sh
' sh "$work/builder" "$work/wheels"

echo "==> OCI image flannel-udp:$tag"
layout="$work/layout"
umoci init --layout "$layout"
umoci new --image "$layout:base"
umoci unpack --image "$layout:base" "$work/bundle" >/dev/null
cp -a "$CACHE/runtime-root/." "$work/bundle/rootfs/"
umoci repack --image "$layout:base" "$work/bundle"
rm -rf "$work/bundle"
umoci unpack --image "$layout:base" "$work/bundle" >/dev/null
rootfs="$work/bundle/rootfs"
cp -a "$work/builder/opt/flannel-udp" "$rootfs/opt/"
install -m 0755 "$work/builder/build/dist/flannel" "$rootfs/flannel"
mkdir -p "$rootfs/opt/bin"
ln -s /opt/flannel-udp/bin/flanneld "$rootfs/opt/bin/flanneld"
ln -s /opt/flannel-udp/bin/flannel-udp "$rootfs/usr/local/bin/flannel-udp"
umoci repack --image "$layout:base" "$work/bundle"
umoci tag --image "$layout:base" "$tag"
umoci rm --image "$layout:base"
umoci config --image "$layout:$tag" --config.cmd /opt/bin/flanneld \
    --config.env PATH=/opt/flannel-udp/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.label org.opencontainers.image.title=flannel-udp \
    --config.label "org.opencontainers.image.version=$version" \
    --config.label org.opencontainers.image.licenses=Apache-2.0
umoci gc --layout "$layout"
mkdir -p "$(dirname "$output")"
tar -C "$layout" -cf "$output.tmp" . && mv "$output.tmp" "$output"
echo "$output: $(du -m "$output" | cut -f1) MiB (layers: $(du -m "$CACHE/runtime-root" -s | cut -f1) MiB of Debian" \
     "unpacked, $(du -sm "$work/builder/opt/flannel-udp" | cut -f1) MiB venv, $(du -m "$rootfs/flannel" | cut -f1) MiB CNI plugin)"
