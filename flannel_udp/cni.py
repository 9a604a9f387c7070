"""The CNI plugin of type `flannel` (an executable named `flannel` for a CNI bin directory), as upstream's flannel CNI
plugin: read subnet.env, build the delegate network config (by default the `bridge` plugin: cni0, isGateway, ipMasq
unless flannel masquerades, mtu = FLANNEL_MTU, host-local IPAM over FLANNEL_SUBNET with a route to the whole
network), keep it per container for DEL, and run the delegate plugin found on CNI_PATH.

Protocol (CNI spec): CNI_COMMAND and friends in the environment, the network config on stdin, the result (or an error
object) on stdout. Unlike upstream, CHECK is delegated too (upstream's is a no-op).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from . import cni_ports
from .defaults import CNI_DATA_DIR as DEFAULT_DATA_DIR
from .defaults import SUBNET_FILE as DEFAULT_SUBNET_FILE
from .subnet import subnetenv

SUPPORTED_VERSIONS = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
# CNI error codes (spec): 4 invalid network config, 7 invalid environment variables, 11 try again later, 999 other.
INVALID_CONFIG, INVALID_ENV, TRY_AGAIN, OTHER = 4, 7, 11, 999


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


def read_subnet_env(path: str) -> subnetenv.SubnetEnv:
    """subnet.env as upstream's plugin reads it, or the CNI error that says why it cannot be used."""
    prefix = f"failed to load flannel 'subnet.env' file: {path}"
    try:
        env = subnetenv.load(path)
    except OSError as e:
        raise CniError(TRY_AGAIN, f"{prefix}: {e.strerror}", "is flanneld running on this node?") from None
    except subnetenv.SubnetEnvError as e:
        raise CniError(INVALID_CONFIG, f"{prefix}: {e}") from None
    missing = env.missing()
    if missing:
        raise CniError(INVALID_CONFIG, f"{path} is missing {', '.join(missing)}")
    return env


def delegate_config(conf: dict, env: subnetenv.SubnetEnv) -> dict:
    """The config handed to the delegate plugin, built as upstream's doCmdAdd does."""
    for section in ("delegate", "ipam"):
        if not isinstance(conf.get(section) or {}, dict):
            raise CniError(INVALID_CONFIG, f"failed to load netconf: '{section}' must be a JSON object")
    delegate = dict(conf.get("delegate") or {})
    if "type" in delegate and not isinstance(delegate["type"], str):
        raise CniError(INVALID_CONFIG, "'delegate' dictionary, if present, must have (string) 'type' field")
    for reserved in ("name", "ipam"):
        if reserved in delegate:
            raise CniError(
                INVALID_CONFIG, f"'delegate' dictionary must not have '{reserved}' field, it'll be set by flannel"
            )
    delegate["name"] = conf.get("name")
    delegate.setdefault("type", "bridge")
    delegate.setdefault("ipMasq", not env.ipmasq)  # flannel masquerades, or the bridge must
    delegate.setdefault("mtu", env.mtu)
    if delegate["type"] == "bridge":
        delegate.setdefault("isGateway", True)
    if conf.get("cniVersion"):
        delegate["cniVersion"] = conf["cniVersion"]
    if conf.get("runtimeConfig"):
        delegate["runtimeConfig"] = conf["runtimeConfig"]
    ipam = dict(conf.get("ipam") or {})
    ipam.setdefault("type", "host-local")
    # One range per family in subnet.env, and a route to each of its networks, IPv4 first, as upstream.
    ipam["ranges"], routes = [], []
    for subnet, networks in ((env.subnet, env.networks), (env.ipv6_subnet, env.ipv6_networks)):
        if subnet is None:
            continue
        ipam["ranges"].append([{"subnet": str(subnet.network)}])
        for network in networks:
            route = {"dst": str(network)}
            if delegate["type"] == "bridge" and delegate.get("isGateway"):
                # The kernel route goes via the bridge's address either way; naming it makes the result say so,
                # which the bridge plugin's CHECK compares against the routing table.
                route["gw"] = str(subnet.ip)
            routes.append(route)
    ipam["routes"] = list(ipam.get("routes") or []) + routes
    delegate["ipam"] = ipam
    return delegate


def find_plugin(name: str) -> str:
    for directory in os.environ.get("CNI_PATH", "").split(os.pathsep):
        candidate = os.path.join(directory, name)
        if directory and os.access(candidate, os.X_OK):
            return candidate
    raise CniError(INVALID_ENV, f"failed to find plugin {name!r} in path {os.environ.get('CNI_PATH', '')!r}")


def run_delegate(config: dict) -> str:
    """Run the delegate with our environment (same CNI_COMMAND) and its config on stdin; its output is ours."""
    result = subprocess.run([find_plugin(config["type"])], input=json.dumps(config), capture_output=True, text=True)
    if result.returncode != 0:
        try:
            error = json.loads(result.stdout)
            raise CniError(
                error.get("code", OTHER), f"delegate {config['type']}: {error.get('msg', '')}", error.get("details", "")
            )
        except (ValueError, AttributeError):
            raise CniError(
                OTHER, f"delegate {config['type']} failed: {(result.stderr or result.stdout).strip()}"
            ) from None
    return result.stdout


def container_id() -> str:
    container = os.environ.get("CNI_CONTAINERID", "")
    if not container or "/" in container or container.startswith("."):
        raise CniError(INVALID_ENV, "CNI_CONTAINERID is missing or invalid")
    return container


def data_dir(conf: dict) -> str:
    return conf.get("dataDir") or DEFAULT_DATA_DIR


def scratch_path(conf: dict) -> str:
    return os.path.join(data_dir(conf), container_id())


def record_port(conf: dict, delegate: dict, output: str) -> None:
    """Remember the host-side veth the bridge delegate attached, for the node agent's cni0 repair. The pod is up
    whatever happens here: a record that cannot be written costs only the repair of this one port."""
    try:
        record = cni_ports.record_from_result(container_id(), delegate, json.loads(output))
        if record is not None:
            cni_ports.write(data_dir(conf), record)
    except (OSError, ValueError, AttributeError) as e:
        print(f"flannel: cannot record the pod's bridge port for cni0 repair: {e}", file=sys.stderr)


def command_add(conf: dict) -> str:
    env = read_subnet_env(conf.get("subnetFile") or DEFAULT_SUBNET_FILE)
    delegate = delegate_config(conf, env)
    path = scratch_path(conf)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(path, "w") as f:  # kept for DEL, which may come after subnet.env changed or vanished
        json.dump(delegate, f)
    os.chmod(path, 0o600)
    output = run_delegate(delegate)
    record_port(conf, delegate, output)
    return output


def saved_delegate(conf: dict) -> dict | None:
    try:
        with open(scratch_path(conf)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:
        return None


def command_del(conf: dict) -> str:
    cni_ports.remove(data_dir(conf), container_id())  # first: the agent must not re-attach a port being torn down
    delegate = saved_delegate(conf)
    if delegate is None:
        return ""  # per spec: already gone is fine
    run_delegate(delegate)
    os.unlink(scratch_path(conf))
    return ""


def command_check(conf: dict) -> str:
    delegate = saved_delegate(conf)
    if delegate is None:
        raise CniError(OTHER, f"no delegate config kept for container {os.environ.get('CNI_CONTAINERID')}")
    if "prevResult" in conf:
        delegate["prevResult"] = conf["prevResult"]
    return run_delegate(delegate)


def main() -> int:
    command = os.environ.get("CNI_COMMAND", "")
    version = "1.0.0"
    try:
        if command == "VERSION":
            print(json.dumps({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}))
            return 0
        try:
            conf = json.loads(sys.stdin.read())
        except ValueError as e:
            raise CniError(INVALID_CONFIG, f"failed to load netconf: {e}") from None
        if not isinstance(conf, dict):
            raise CniError(INVALID_CONFIG, "failed to load netconf: not a JSON object")
        version = conf.get("cniVersion") or version
        handlers = {"ADD": command_add, "DEL": command_del, "CHECK": command_check}
        if command not in handlers:
            raise CniError(INVALID_ENV, f"unknown CNI_COMMAND {command!r}")
        sys.stdout.write(handlers[command](conf))
        return 0
    except CniError as e:
        print(json.dumps({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details}))
        return 1


if __name__ == "__main__":
    sys.exit(main())
