"""Every default path and port, in one place: the daemon, the command line, the CNI plugin and the tools share them."""

NET_CONFIG_PATH = "/etc/kube-flannel/net-conf.json"  # as kube-flannel.yml mounts it
SUBNET_FILE = "/run/flannel/subnet.env"  # written by the node agent, read by the CNI plugin
LEASE_FILE = "/var/lib/flannel-udp/leases.db"  # the embedded lease store, shared by the node processes of a machine
UDP_PORT = 8285  # the udp backend's port, as upstream (Backend.Port)
WIREGUARD_PORT = 51820  # the wireguard backend's ListenPort, as upstream
WIREGUARD_PORT_V6 = 51821  # its ListenPortV6 (flannel-wg-v6), as upstream
VXLAN_PORT = 8472  # the kernel's vxlan port, which the vxlan backend keeps unless Backend.Port says otherwise
CNI_DATA_DIR = "/var/lib/cni/flannel"  # the flannel CNI plugin's dataDir
LEASE_TTL = 24 * 3600  # seconds a lease lives without renewal, as upstream's fixed 24 h (-lease-ttl)
