"""WireGuard keys as upstream keeps them: base64 of 32 bytes; the node's private key in /run/flannel/wgkey (or the
file WIREGUARD_KEY_FILE names), made on first start with mode 0400 and reused on every later one, so peers keep
knowing the node across restarts."""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .noise import private_bytes

DEFAULT_KEY_FILE = "/run/flannel/wgkey"


class WireguardKeyError(ValueError):
    """A key that is not base64 of 32 bytes, or a key file that cannot be read or written."""


def parse_key(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise WireguardKeyError(f"{what} is not base64") from None
    if len(raw) != 32:
        raise WireguardKeyError(f"{what} is {len(raw)} bytes, a WireGuard key is 32")
    return raw


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def key_file() -> str:
    return os.environ.get("WIREGUARD_KEY_FILE", DEFAULT_KEY_FILE)


def load_or_create(path: str) -> X25519PrivateKey:
    """The private key in `path`, made (and written with mode 0400) when the file does not exist."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        key = X25519PrivateKey.generate()
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(encode_key(private_bytes(key)))
        except OSError as e:
            raise WireguardKeyError(f"could not write key file {path}: {e.strerror}") from None
        return key
    except OSError as e:
        raise WireguardKeyError(f"could not read key file {path}: {e.strerror}") from None
    try:
        return X25519PrivateKey.from_private_bytes(parse_key(text, f"the private key in {path}"))
    except WireguardKeyError as e:
        raise WireguardKeyError(f"could not parse private key from file: {e}") from None
