#!/usr/bin/env bash
# Builds the real Go programs that the tests, the demo and the benchmarks start beside ours: kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kube-proxy and kubectl from the Go module k8s.io/kubernetes (with
# the pause program of its pod sandboxes), and upstream flanneld (the program flannel-udp replaces,
# for mixed clusters) from github.com/flannel-io/flannel, each at one pinned release. Each is built once per machine
# into a cache outside the clone and reused while that version's binaries are there.
#
# k8s.io/kubernetes replaces its staging modules (k8s.io/api, client-go, ...) with local paths, which Go ignores in a
# dependency, so the small build module made here pins each of them to its published v0.<minor>.<patch> instead.
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:-v1.34.4}"
FLANNEL_VERSION="${FLANNEL_VERSION:-v0.28.10}"
CACHE="${FLANNEL_UDP_CACHE:-/var/cache/flannel-udp}"
GO="${GO:-/usr/local/go/bin/go}"
[ -x "$GO" ] || GO="$(command -v go || true)"
if [ -z "$GO" ] || [ ! -x "$GO" ]; then
    echo "error: Go is needed to build kube-apiserver and kube-controller-manager; install it at /usr/local/go" >&2
    exit 1
fi

# build_module DEST MINUTES MODULE VERSION CGO LDFLAGS REPLACES PACKAGE...: go build each PACKAGE of MODULE@VERSION
# into DEST ("" names the module's root package); MINUTES: what a first build took on a fresh 2-core machine, in this
# order (the node programs reuse the compiled packages of the servers), announced;
# REPLACES: space-separated OLD=NEW@VERSION pins for the build module.
build_module() {
    local dest="$1" minutes="$2" module="$3" version="$4" cgo="$5" ldflags="$6" replaces="$7"
    shift 7
    local stamp="$dest/.built" what="$module@$version $*"
    if [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$what" ]; then
        return 0
    fi
    local work="$CACHE/build/$(basename "$dest")"
    rm -rf "$work" && mkdir -p "$work" && cd "$work"
    echo "==> building $module@$version ($*) into $dest, once per machine (about $minutes min on 2 cores)"
    local started=$SECONDS
    "$GO" mod init flannel-udp-build >/dev/null 2>&1
    "$GO" mod edit -require="$module@$version"
    # Pin every module that upstream replaces with a ./staging path to the release of the same minor/patch.
    local modfile staging_version
    modfile="$("$GO" mod download -json "$module@$version" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
    staging_version="v0.${version#v1.}"
    for staged in $(awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' "$modfile"); do
        "$GO" mod edit -replace="$staged=$staged@$staging_version"
    done
    for pin in $replaces; do
        "$GO" mod edit -replace="$pin"
    done
    local pkgs=()
    for p in "$@"; do pkgs+=("$module${p:+/$p}"); done
    "$GO" get "${pkgs[@]/%/@$version}" >/dev/null 2>&1 || "$GO" get "$module@$version"
    mkdir -p "$dest.tmp"
    CGO_ENABLED="$cgo" "$GO" build -trimpath -ldflags "-s -w $ldflags" -o "$dest.tmp/" "${pkgs[@]}"
    rm -rf "$dest" && mv "$dest.tmp" "$dest"
    printf '%s\n%s\n' "$what" "$module@$version built in $((SECONDS - started)) s" > "$stamp"
    tail -n 1 "$stamp"
    cd "$CACHE" && rm -rf "$work"
}

minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
version_flags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    version_flags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    version_flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
build_module "$CACHE/kube-$KUBE_VERSION" 5 k8s.io/kubernetes "$KUBE_VERSION" 0 "$version_flags" "" \
    cmd/kube-apiserver cmd/kube-controller-manager
# The rest of a cluster (scheduler, kubelet, kube-proxy, kubectl) for the tests and the demo that run pods under
# kubelets, and the pause program of every pod sandbox, compiled from the same module's build/pause/linux/pause.c.
build_module "$CACHE/kube-node-$KUBE_VERSION" 1 k8s.io/kubernetes "$KUBE_VERSION" 0 "$version_flags" "" \
    cmd/kube-scheduler cmd/kubelet cmd/kube-proxy cmd/kubectl
if [ ! -x "$CACHE/kube-node-$KUBE_VERSION/pause" ]; then
    pause_c="$("$GO" env GOMODCACHE)/k8s.io/kubernetes@$KUBE_VERSION/build/pause/linux/pause.c"
    [ -f "$pause_c" ] || "$GO" mod download "k8s.io/kubernetes@$KUBE_VERSION"
    gcc -Os -static -DVERSION="$KUBE_VERSION" -o "$CACHE/kube-node-$KUBE_VERSION/pause.tmp" "$pause_c"
    mv "$CACHE/kube-node-$KUBE_VERSION/pause.tmp" "$CACHE/kube-node-$KUBE_VERSION/pause"
fi

# flanneld with cgo on: its udp backend is C. The binary is named after the module (flannel); it is run as upstream's
# flanneld. The Tencent Cloud VPC SDK version that release requires is not served by the Go module proxy (403), so the
# build module pins the nearest one it serves; only the tencent-vpc cloud backend, never used here, links it.
TENCENT_VPC=github.com/tencentcloud/tencentcloud-sdk-go/tencentcloud/vpc
build_module "$CACHE/flannel-$FLANNEL_VERSION" 2 github.com/flannel-io/flannel "$FLANNEL_VERSION" 1 \
    "-X github.com/flannel-io/flannel/pkg/version.Version=$FLANNEL_VERSION" "$TENCENT_VPC=$TENCENT_VPC@v1.3.75" ""
