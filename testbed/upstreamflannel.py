"""Upstream flanneld, the program flannel-udp replaces, as a peer in mixed clusters for tests and benchmarks: built from
the Go module github.com/flannel-io/flannel by scripts/build-go-servers.sh into the cache outside the clone."""

from __future__ import annotations

import os

from .kubeserver import CACHE

FLANNEL_VERSION = "v0.28.10"  # keep in step with scripts/build-go-servers.sh


def flanneld_path() -> str:
    return os.path.join(CACHE, f"flannel-{FLANNEL_VERSION}", "flannel")


def available() -> bool:
    return os.access(flanneld_path(), os.X_OK)
