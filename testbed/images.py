"""OCI archives of the small images a cluster of the testbed needs besides flannel-udp's own (scripts/build-image.sh):
the pod sandbox's pause program (built from k8s.io/kubernetes by scripts/build-go-servers.sh) and a test pod image
with Debian's static busybox (sh, ping, nc, sleep). Each is a root directory packed by umoci into an OCI layout and
tarred, as `ctr images import` takes it; nothing is pulled from any registry."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from .kubeserver import node_binaries_dir

PAUSE_IMAGE = "registry.k8s.io/pause:3.10"  # the name kubelet and containerd expect for the sandbox
TEST_IMAGE = "docker.io/library/busybox:testbed"
BUSYBOX = "/bin/busybox"  # Debian's busybox-static
BUSYBOX_TOOLS = ("sh", "ping", "nc", "sleep", "cat", "ip", "hostname", "wget", "echo", "true")


class ImageError(RuntimeError):
    pass


def _run(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise ImageError(f"{' '.join(args)}: {result.stderr.strip()}")


def oci_archive(root: str, tag: str, output: str, entrypoint: list[str]) -> str:
    """Pack the directory root as a one-layer image tagged `tag` into the OCI archive `output`."""
    work = tempfile.mkdtemp(prefix="flannel-udp-oci-")
    try:
        layout, bundle = os.path.join(work, "layout"), os.path.join(work, "bundle")
        _run("umoci", "init", "--layout", layout)
        _run("umoci", "new", "--image", f"{layout}:{tag}")
        _run("umoci", "unpack", "--image", f"{layout}:{tag}", bundle)
        shutil.copytree(root, os.path.join(bundle, "rootfs"), symlinks=True, dirs_exist_ok=True)
        _run("umoci", "repack", "--image", f"{layout}:{tag}", bundle)
        config = [f"--config.entrypoint={arg}" for arg in entrypoint]
        _run("umoci", "config", "--image", f"{layout}:{tag}", *config)
        _run("umoci", "gc", "--layout", layout)
        _run("tar", "-C", layout, "-cf", output, ".")
        return output
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pause_archive(workdir: str) -> str:
    root = tempfile.mkdtemp(prefix="pause-root-", dir=workdir)
    shutil.copy2(os.path.join(node_binaries_dir(), "pause"), os.path.join(root, "pause"))
    return oci_archive(root, PAUSE_IMAGE.rpartition(":")[2], os.path.join(workdir, "pause.oci.tar"), ["/pause"])


def test_pod_archive(workdir: str) -> str:
    if not os.access(BUSYBOX, os.X_OK):
        raise ImageError(f"{BUSYBOX} is missing (Debian busybox-static; scripts/setup.sh installs it)")
    root = tempfile.mkdtemp(prefix="busybox-root-", dir=workdir)
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy2(BUSYBOX, os.path.join(root, "bin", "busybox"))
    for tool in BUSYBOX_TOOLS:
        os.symlink("busybox", os.path.join(root, "bin", tool))
    for folder in ("tmp", "etc", "proc", "sys", "dev"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    return oci_archive(root, TEST_IMAGE.rpartition(":")[2], os.path.join(workdir, "busybox.oci.tar"), ["/bin/sh"])
