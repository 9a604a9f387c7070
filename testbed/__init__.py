"""The test bed: clusters of hosts and pods in network namespaces (cluster), real etcd members (etcdserver), a real
Kubernetes control plane (kubeserver) and upstream's flanneld (upstreamflannel), for the tests, the benchmarks and the
demo.

The node agent never imports this package: it knows nothing of the namespaces built around it.
"""
