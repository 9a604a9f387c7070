"""Which host-side veths the `flannel` CNI plugin attached to which bridge: one small JSON file per container, written
after a successful ADD and removed at DEL, so that the node agent can rebuild a deleted cni0 and re-attach exactly
these ports (and nothing else that happens to live on the node).

The records live beside the plugin's data directory, in `<dataDir>-ports/<container id>` (a directory of its own: a
container ID may be any name the plugin's own files use). The plugin writes them; the node agent only reads them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class PortRecord:
    container: str
    bridge: str
    bridge_mac: str  # the bridge keeps its MAC when rebuilt: the pods' neighbour entries for the gateway stay valid
    veth: str
    veth_index: int  # with the name, so that a later link that reuses the name is never enslaved by mistake
    hairpin: bool
    written: float = 0.0  # when the record was written (its file's mtime)


def ports_dir(data_dir: str) -> str:
    return os.path.normpath(data_dir) + "-ports"


def record_path(data_dir: str, container: str) -> str:
    return os.path.join(ports_dir(data_dir), container)


def record_from_result(container: str, delegate: dict, result: dict) -> PortRecord | None:
    """The port a `bridge` delegate's ADD result describes: the bridge and the one host-side interface beside it (the
    interface without a sandbox). None for other delegates, or results without interfaces (CNI < 0.3.0)."""
    if delegate.get("type") != "bridge":
        return None
    bridge_name = delegate.get("bridge") or "cni0"
    # Only well-formed host-side entries (the delegate's output is not trusted to be).
    interfaces = [
        i
        for i in result.get("interfaces") or []
        if isinstance(i, dict)
        and not i.get("sandbox")
        and isinstance(i.get("name"), str)
        and i["name"]
        and "/" not in i["name"]
        and i["name"] != "."
        and i["name"] != ".."
        and isinstance(i.get("mac"), str)
    ]
    bridge = next((i for i in interfaces if i["name"] == bridge_name), None)
    veth = next((i for i in interfaces if i["name"] != bridge_name), None)
    if bridge is None or veth is None:
        return None
    try:
        with open(f"/sys/class/net/{veth['name']}/ifindex") as f:
            index = int(f.read())
    except (OSError, ValueError):
        return None
    return PortRecord(container, bridge_name, bridge["mac"], veth["name"], index, bool(delegate.get("hairpinMode")))


def write(data_dir: str, record: PortRecord) -> None:
    directory = ports_dir(data_dir)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = record_path(data_dir, record.container)
    scratch = os.path.join(directory, f".{record.container}.tmp")  # a container ID never starts with a dot
    with open(scratch, "w") as f:
        json.dump(
            {
                "bridge": record.bridge,
                "bridgeMac": record.bridge_mac,
                "veth": record.veth,
                "vethIndex": record.veth_index,
                "hairpin": record.hairpin,
            },
            f,
        )
    os.replace(scratch, path)  # the node agent never reads half a record


def remove(data_dir: str, container: str) -> None:
    try:
        os.unlink(record_path(data_dir, container))
    except FileNotFoundError:
        pass


def read_all(data_dir: str) -> list[PortRecord]:
    """Every record that can be read; a damaged one is skipped (it names nothing the agent may touch)."""
    directory = ports_dir(data_dir)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    records = []
    for name in sorted(names):
        if name.startswith("."):
            continue
        try:
            with open(os.path.join(directory, name)) as f:
                raw = json.load(f)
                written = os.fstat(f.fileno()).st_mtime
            records.append(
                PortRecord(
                    name,
                    str(raw["bridge"]),
                    str(raw["bridgeMac"]),
                    str(raw["veth"]),
                    int(raw["vethIndex"]),
                    bool(raw["hairpin"]),
                    written,
                )
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return records
