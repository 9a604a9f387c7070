"""Real WireGuard programs as peers of the wireguard backend: wireguard-go and boringtun (built by
scripts/build-wireguard-peers.sh into the cache), each run in a host's namespace with its own TUN and configured with
`wg` (Debian's wireguard-tools) over its UAPI socket, as an operator would. The peer node's lease is planted in the
embedded store as upstream flanneld would write it (BackendType wireguard, BackendData with PublicKey and Port)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import subprocess
from dataclasses import dataclass

from .cluster import Host, Testbed, in_ns, sh, wait_for
from .kubeserver import CACHE

WIREGUARD_GO_VERSION = "v0.0.0-20260522210424-ecfc5a8d5446"
BORINGTUN_VERSION = "0.7.1"
PROGRAMS = {
    "wireguard-go": os.path.join(CACHE, f"wireguard-go-{WIREGUARD_GO_VERSION}", "wireguard"),
    "boringtun": os.path.join(CACHE, f"boringtun-{BORINGTUN_VERSION}", "bin", "boringtun-cli"),
}
UAPI_DIR = "/var/run/wireguard"
PORT = 51820
PORT_V6 = 51821  # upstream's ListenPortV6: an IPv6 peer listens here, as flannel-wg-v6 does


def available(kind: str) -> bool:
    return os.access(PROGRAMS[kind], os.X_OK)


def program(kind: str) -> str:
    path = PROGRAMS[kind]
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{kind} is not built at {path}: run scripts/build-wireguard-peers.sh")
    return path


def public_key_of(private: str) -> str:
    return subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True, check=True).stdout.strip()


@dataclass
class WgPeer:
    """A WireGuard program running as a node: its device, keys, and the subnet its lease holds."""

    kind: str
    host: Host
    device: str
    private: str
    public: str
    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network
    process: subprocess.Popen

    @property
    def port(self) -> int:
        return PORT if self.subnet.version == 4 else PORT_V6

    @property
    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The device's own address, its subnet's network address (as flannel gives its devices; the pods' bridge
        takes the first one): the target of pings and iperf3."""
        return self.subnet.network_address

    def wg(self, *args: str) -> subprocess.CompletedProcess:
        return in_ns(self.host.ns, "wg", *args)

    def add_node(self, public: str, endpoint: str, subnet: str) -> None:
        self.wg("set", self.device, "peer", public, "endpoint", endpoint, "allowed-ips", subnet)

    def received_from(self, public: str) -> int:
        """Bytes the program received from that peer (`wg show transfer`; boringtun reports no handshake times)."""
        for line in self.wg("show", self.device, "transfer").stdout.splitlines():
            key, received, _ = line.split("\t")
            if key == public:
                return int(received)
        return 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            os.unlink(os.path.join(UAPI_DIR, f"{self.device}.sock"))
        except FileNotFoundError:
            pass


def start_wg_peer(
    bed: Testbed, host: Host, kind: str, subnet: str, network: str = "10.244.0.0/16", lease: bool = True
) -> WgPeer:
    """Start `kind` in host's namespace as the node of `subnet` (IPv4, or IPv6 in an IPv6-only `network`: then on
    PORT_V6 and the host's IPv6 address), with its lease in the testbed's embedded store (lease False: none, for a
    cluster of these programs alone) and the subnet.env its pods' CNI plugin reads."""
    device = f"wg{secrets.token_hex(4)}"
    if kind == "wireguard-go":
        cmd = [program(kind), "-f", device]
    else:
        cmd = [program(kind), "-f", "--disable-drop-privileges", "-t", "2", "-l", "/dev/stdout", device]
    with open(os.path.join(bed.workdir, f"{host.name}-{kind}.log"), "ab") as log:  # the child keeps its own copy
        process = subprocess.Popen(["ip", "netns", "exec", host.ns, *cmd], stdout=log, stderr=subprocess.STDOUT)
    bed.extra_processes.append(process)
    bed.extra_files.append(os.path.join(UAPI_DIR, f"{device}.sock"))
    private = sh("wg", "genkey").stdout.strip()
    peer = WgPeer(kind, host, device, private, public_key_of(private), ipaddress.ip_network(subnet), process)
    if not wait_for(lambda: os.path.exists(os.path.join(UAPI_DIR, f"{device}.sock")), 10):
        peer.stop()
        raise RuntimeError(f"{kind} did not open its UAPI socket")
    key_file = os.path.join(bed.workdir, f"{device}.key")
    with open(key_file, "w") as f:
        f.write(private)
    peer.wg("set", device, "private-key", key_file, "listen-port", str(peer.port))
    in_ns(host.ns, "ip", "addr", "add", f"{peer.address}/{peer.subnet.max_prefixlen}", "dev", device)
    in_ns(host.ns, "ip", "link", "set", device, "mtu", "1420", "up")
    in_ns(host.ns, "ip", "route", "add", network, "dev", device)
    v6 = "IPV6_" if peer.subnet.version == 6 else ""
    with open(host.subnet_file, "w") as f:
        f.write(
            f"FLANNEL_{v6}NETWORK={network}\n"
            f"FLANNEL_{v6}SUBNET={peer.subnet.network_address + 1}/{peer.subnet.prefixlen}\n"
        )
        f.write("FLANNEL_MTU=1420\nFLANNEL_IPMASQ=false\n")
    if lease:
        plant_lease(bed, peer)
    return peer


def start_wg_cluster(bed: Testbed, kind: str) -> list[WgPeer]:
    """`kind` on every host of the testbed, each the node of its own subnet and a peer of all the others."""
    peers = [start_wg_peer(bed, host, kind, f"10.244.{200 + i}.0/24", lease=False) for i, host in enumerate(bed.hosts)]
    for peer in peers:
        for other in peers:
            if other is not peer:
                peer.add_node(other.public, f"{other.host.address}:{PORT}", str(other.subnet))
    return peers


def plant_lease(bed: Testbed, peer: WgPeer) -> None:
    """The peer node's lease, as upstream flanneld with the wireguard backend writes it (in an IPv6-only network: no
    IPv4 address but 0.0.0.0, the key and port in BackendV6Data)."""
    from flannel_udp.subnet.local.registry import LocalRegistry

    from .stores import put_raw

    v4 = peer.subnet.version == 4
    attrs = {
        "PublicIP": str(peer.host.address) if v4 else "0.0.0.0",
        "PublicIPv6": None if v4 else str(peer.host.address6),
        "BackendType": "wireguard",
        "BackendData" if v4 else "BackendV6Data": {"PublicKey": peer.public, "Port": peer.port},
    }
    value = json.dumps(attrs, separators=(",", ":"))
    key = f"{peer.subnet.network_address}-{peer.subnet.prefixlen}"

    async def put() -> None:
        registry = LocalRegistry(bed.lease_file)
        try:
            await put_raw(registry, key, value, 3600)
        finally:
            await registry.close()

    asyncio.run(put())
