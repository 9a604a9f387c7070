"""The CNI plugin's input: the network configuration on stdin and subnet.env. Any bytes give the delegate
configuration or a CniError (which the plugin prints as CNI's error JSON), nothing else."""

from __future__ import annotations

import json
import os
import tempfile

from flannel_udp.cni import CniError, delegate_config, read_subnet_env

ENV_FILE = os.path.join(tempfile.mkdtemp(prefix="fuzz-cni-"), "subnet.env")


def test_one_input(data: bytes) -> None:
    env_text, _, stdin = data.partition(b"\0")  # the input: subnet.env, a NUL byte, the plugin's stdin
    with open(ENV_FILE, "wb") as f:
        f.write(env_text)
    try:
        env = read_subnet_env(ENV_FILE)
        try:
            conf = json.loads(stdin)
        except ValueError:
            return  # the plugin answers "failed to load netconf"
        if not isinstance(conf, dict):
            return
        delegate = delegate_config(conf, env)
    except CniError as e:
        assert e.msg and isinstance(e.code, int)
        return
    assert isinstance(delegate, dict) and isinstance(delegate["type"], str)
