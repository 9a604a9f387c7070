"""flannel-udp: flanneld re-implemented in Python with a fast userspace UDP/TUN data plane."""

__version__ = "0.1.0"
