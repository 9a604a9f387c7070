"""WireGuard in userspace for the wireguard backend: the handshake (noise.py), the private key kept across restarts
(keys.py) and the control plane of a device (device.py); the per-packet path is _fastpath/wg.pyx."""
