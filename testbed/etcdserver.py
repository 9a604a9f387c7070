"""Real etcd servers (Debian's etcd-server) for tests, the benchmarks and the demo: one member or a cluster.

Members listen on loopback in the current namespace, or on addresses inside a namespace the caller made (`ns`), with
their data in a private temporary folder. Every member can be stopped, killed and started again to exercise the store's
fault handling. close() kills what was started, by PID, and removes the data.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

ETCD = "etcd"


class EtcdServerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Member:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: str
    log_path: str
    client_scheme: str = "http"
    process: subprocess.Popen | None = None

    @property
    def client_url(self) -> str:
        return f"{self.client_scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"


class EtcdCluster:
    def __init__(
        self,
        hosts: list[str] | None = None,
        ns: str | None = None,
        extra_args: tuple[str, ...] = (),
        client_port: int | None = None,
        peer_port: int | None = None,
        client_scheme: str = "http",
    ) -> None:
        """One member per host address (default: one on 127.0.0.1). Inside `ns` the ports are fixed (2379/2380
        unless given); on the caller's loopback they are picked free. client_scheme "https" needs the TLS flags of
        etcd in extra_args."""
        if shutil.which(ETCD) is None:
            raise EtcdServerError("etcd is not installed (Debian package etcd-server)")
        hosts = hosts or ["127.0.0.1"]
        self.ns = ns
        self.extra_args = extra_args
        self.workdir = tempfile.mkdtemp(prefix="flannel-udp-etcd-")
        self.members = []
        for i, host in enumerate(hosts):
            cport = client_port or (2379 if ns else free_port(host))
            pport = peer_port or (2380 if ns else free_port(host))
            self.members.append(
                Member(
                    f"m{i}",
                    host,
                    cport,
                    pport,
                    os.path.join(self.workdir, f"m{i}"),
                    os.path.join(self.workdir, f"m{i}.log"),
                    client_scheme,
                )
            )
        try:
            for member in self.members:
                self.start(member, wait=False)
            for member in self.members:
                self.wait_healthy(member)
        except BaseException:
            self.close()
            raise

    @property
    def endpoints(self) -> str:
        return ",".join(m.client_url for m in self.members)

    def _command(self, member: Member) -> list[str]:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        cmd = [
            ETCD,
            "--name",
            member.name,
            "--data-dir",
            member.data_dir,
            "--listen-client-urls",
            member.client_url,
            "--advertise-client-urls",
            member.client_url,
            "--listen-peer-urls",
            member.peer_url,
            "--initial-advertise-peer-urls",
            member.peer_url,
            "--initial-cluster",
            initial,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            self.workdir,
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            *self.extra_args,
        ]
        return ["ip", "netns", "exec", self.ns, *cmd] if self.ns else cmd

    def start(self, member: Member, wait: bool = True) -> None:
        with open(member.log_path, "ab") as log:
            member.process = subprocess.Popen(
                self._command(member), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        if wait:
            self.wait_healthy(member)

    def wait_healthy(self, member: Member, timeout: float = 20) -> None:
        """Wait until the member answers on its client port (a cluster serves once a quorum has started)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if member.process.poll() is not None:
                raise EtcdServerError(f"etcd {member.name} exited: {self.log(member)[-1500:]}")
            if "ready to serve client requests" in self.log(member):
                return
            time.sleep(0.05)
        raise EtcdServerError(f"etcd {member.name} not serving after {timeout}s: {self.log(member)[-1500:]}")

    def log(self, member: Member) -> str:
        try:
            with open(member.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self, member: Member, kill: bool = False) -> None:
        if member.process is None:
            return
        if member.process.poll() is None:
            member.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                member.process.wait(10)
            except subprocess.TimeoutExpired:
                member.process.kill()
                member.process.wait()
        member.process = None
        # The next start appends to the log; forget the old "ready" line.
        os.replace(member.log_path, member.log_path + f".{time.monotonic_ns()}")

    def close(self) -> None:
        for member in self.members:
            try:
                self.stop(member, kill=True)
            except OSError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
