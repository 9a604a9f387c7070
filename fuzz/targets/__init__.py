"""One module per fuzz target; each has test_one_input(data: bytes) and raises only when it finds a bug."""

NAMES = ("pump", "netconf", "lease", "cni", "kube", "wireguard")
