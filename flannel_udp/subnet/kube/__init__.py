"""The Kubernetes subnet manager: leases are the Nodes' podCIDRs and annotations (upstream pkg/subnet/kube)."""
