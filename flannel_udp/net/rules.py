"""Traffic rules as upstream's trafficmngr: masquerade (-ip-masq) and forward accept (-iptables-forward-rules), through
iptables-restore --noflush (iptables mode) or nft (EnableNFTables), kept in place by a periodic resync.

Rule texts, order and comments are upstream's (pkg/trafficmngr/iptables/iptables.go and nftables/nftables.go), so
`iptables -S` on a flannel-udp node reads like one on a flanneld node. Everything here runs the iptables/nft binaries
of the node's namespace; callers run it off the event loop.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)

MASQ_COMMENT = "flanneld masq"
FORWARD_COMMENT = "flanneld forward"
BUILTIN_CHAINS = {"POSTROUTING", "FORWARD", "PREROUTING", "INPUT", "OUTPUT"}


class RulesError(RuntimeError):
    pass


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    spec: tuple[str, ...]

    def restore_line(self, action: str) -> str:
        # iptables-restore payload: tokens joined by spaces, the comment quoted (upstream's iptables_restore.go).
        tokens, quote_next = [], False
        for token in self.spec:
            tokens.append(f'"{token}"' if quote_next else token)
            quote_next = token == "--comment"
        return f"{action} {self.chain} {' '.join(tokens)}"


def _comment(text: str) -> tuple[str, ...]:
    return ("-m", "comment", "--comment", text)


def multicast_of(network) -> str:
    return "224.0.0.0/4" if network.version == 4 else "ff00::/8"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def masq_rules(cluster: Network, pod: Network, random_fully: bool) -> list[Rule]:
    """Upstream's set; for IPv6 (ip6tables) the same with ff00::/8 as the multicast range."""
    c, net, sub = _comment(MASQ_COMMENT), str(cluster), str(pod)
    fully = ("--random-fully",) if random_fully else ()
    chain = "FLANNEL-POSTRTG"
    return [
        Rule("nat", "POSTROUTING", c + ("-j", chain)),
        Rule("nat", chain, ("-m", "mark", "--mark", "0x4000/0x4000") + c + ("-j", "RETURN")),  # kube-proxy marked
        Rule("nat", chain, ("-s", sub, "-d", net) + c + ("-j", "RETURN")),
        Rule("nat", chain, ("-s", net, "-d", sub) + c + ("-j", "RETURN")),
        Rule("nat", chain, ("!", "-s", net, "-d", sub) + c + ("-j", "RETURN")),
        Rule("nat", chain, ("-s", net, "!", "-d", multicast_of(cluster)) + c + ("-j", "MASQUERADE") + fully),
        Rule("nat", chain, ("!", "-s", net, "-d", net) + c + ("-j", "MASQUERADE") + fully),
    ]


def forward_rules(cluster: Network) -> list[Rule]:
    c, net = _comment(FORWARD_COMMENT), str(cluster)
    return [
        Rule("filter", "FORWARD", c + ("-j", "FLANNEL-FWD")),
        Rule("filter", "FLANNEL-FWD", ("-s", net) + c + ("-j", "ACCEPT")),
        Rule("filter", "FLANNEL-FWD", ("-d", net) + c + ("-j", "ACCEPT")),
    ]


def restore_payload(lines_by_table: dict[str, list[str]]) -> str:
    return "".join(
        f"*{table}\n" + "".join(line + "\n" for line in lines) + "COMMIT\n"
        for table, lines in lines_by_table.items()
        if lines
    )


class Iptables:
    """The iptables (or ip6tables) binaries of this namespace, as upstream drives them through go-iptables and
    iptables-restore."""

    def __init__(self, binary: str = "iptables") -> None:
        self.binary = binary
        if shutil.which(binary) is None or shutil.which(f"{binary}-restore") is None:
            raise RulesError(f"failed to setup IPTables. {binary} binary was not found")
        version = self._run(binary, "--version").stdout
        match = re.search(r"v(\d+)\.(\d+)\.(\d+)", version)
        numbers = tuple(int(x) for x in match.groups()) if match else (0, 0, 0)
        self.recent = numbers >= (1, 6, 2)  # --random-fully and iptables-restore --wait exist from 1.6.2

    @staticmethod
    def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), input=stdin, capture_output=True, text=True, timeout=30)

    def exists(self, rule: Rule) -> bool:
        return self._run(self.binary, "-w", "-t", rule.table, "-C", rule.chain, *rule.spec).returncode == 0

    def chain_exists(self, table: str, chain: str) -> bool:
        return self._run(self.binary, "-w", "-t", table, "-S", chain).returncode == 0

    def ensure_chain(self, table: str, chain: str) -> None:
        """Create the chain, or flush it if it exists (upstream's ClearChain)."""
        if self._run(self.binary, "-w", "-t", table, "-N", chain).returncode != 0:
            self._run(self.binary, "-w", "-t", table, "-F", chain)

    def restore(self, payload: str) -> None:
        if not payload:
            return
        result = self._run(f"{self.binary}-restore", "--noflush", *(["--wait"] if self.recent else []), stdin=payload)
        if result.returncode != 0:
            raise RulesError(f"{self.binary}-restore failed: {result.stderr.strip()}")

    def install(self, rules: list[Rule]) -> None:
        """Upstream's bootstrap: (re)create the chains, then per rule `-D` if present and `-A`, in one restore."""
        for table, chain in dict.fromkeys((r.table, r.chain) for r in rules):
            if chain not in BUILTIN_CHAINS:
                self.ensure_chain(table, chain)
        lines: dict[str, list[str]] = {}
        for rule in rules:
            if self.exists(rule):
                lines.setdefault(rule.table, []).append(rule.restore_line("-D"))
            lines.setdefault(rule.table, []).append(rule.restore_line("-A"))
        self.restore(restore_payload(lines))

    def ensure(self, rules: list[Rule]) -> bool:
        """Reinstall the whole set when any rule or chain is missing (order restored too); True if it did."""
        chains = {(r.table, r.chain) for r in rules if r.chain not in BUILTIN_CHAINS}
        if all(self.chain_exists(t, c) for t, c in chains) and all(self.exists(r) for r in rules):
            return False
        self.install(rules)
        return True

    def delete(self, rules: list[Rule]) -> list[Rule]:
        """Delete those of the rules that exist; returns them."""
        present = [r for r in rules if self.exists(r)]
        lines: dict[str, list[str]] = {}
        for rule in present:
            lines.setdefault(rule.table, []).append(rule.restore_line("-D"))
        self.restore(restore_payload(lines))
        return present

    def remove_chains(self, rules: list[Rule]) -> list[str]:
        """Delete the rules, then flush and delete their own chains (for cleanup)."""
        removed = [
            f"{self.binary} -t {r.table} -D {r.chain} ..."
            for r in self.delete([r for r in rules if r.chain in BUILTIN_CHAINS])
        ]
        for table, chain in dict.fromkeys((r.table, r.chain) for r in rules if r.chain not in BUILTIN_CHAINS):
            if self.chain_exists(table, chain):
                self._run(self.binary, "-w", "-t", table, "-F", chain)
                self._run(self.binary, "-w", "-t", table, "-X", chain)
                removed.append(f"{self.binary} chain {table}/{chain}")
        return removed


# -- nftables mode -------------------------------------------------------------------------------------------------
NFT_TABLES = (("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6"))


def nft(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=30)


def nft_supports_fully_random() -> bool:
    """Upstream dry-runs a masquerade fully-random rule in a test chain; `nft -c` checks without applying."""
    probe = (
        "table ip flannel-probe {\n chain masqueradeTest {\n  type nat hook postrouting priority srcnat;\n"
        "  masquerade fully-random\n }\n}\n"
    )
    return (
        subprocess.run(["nft", "-c", "-f", "-"], input=probe, capture_output=True, text=True, timeout=30).returncode
        == 0
    )


def nft_script(families: list[tuple[Network, Network]], masq: bool, forward: bool, fully_random: bool) -> str:
    """Both tables (upstream creates them whatever the families), except the IPv4 one in an IPv6-only network, where
    nothing of IPv4 is created; chains and rules for each (cluster, pod)."""
    ipv6_only = all(cluster.version == 6 for cluster, _ in families)
    tables = NFT_TABLES[1:] if ipv6_only else NFT_TABLES
    lines = [f'add table {family} {name} {{ comment "rules for {name}" ; }}' for family, name in tables]
    for cluster, pod in families:
        family, table = NFT_TABLES[0] if cluster.version == 4 else NFT_TABLES[1]
        at, net, sub = f"{family} {table}", str(cluster), str(pod)
        if forward:
            lines += [
                f"add chain {at} forward {{ type filter hook forward priority filter ; "
                'comment "chain to accept flannel traffic" ; }',
                f"flush chain {at} forward",
                f"add rule {at} forward {family} saddr {net} accept",
                f"add rule {at} forward {family} daddr {net} accept",
            ]
        if masq:
            fully = " fully-random" if fully_random else ""
            lines += [
                f"add chain {at} postrtg {{ type nat hook postrouting priority srcnat ; "
                'comment "chain to manage traffic masquerading by flannel" ; }',
                f"flush chain {at} postrtg",
                f"add rule {at} postrtg meta mark 0x4000 return",
                f"add rule {at} postrtg {family} saddr {sub} {family} daddr {net} return",
                f"add rule {at} postrtg {family} saddr {net} {family} daddr {sub} return",
                f"add rule {at} postrtg {family} saddr != {sub} {family} daddr {net} return",
                f"add rule {at} postrtg {family} saddr {net} {family} daddr != {multicast_of(cluster)} "
                f"masquerade{fully}",
                f"add rule {at} postrtg {family} saddr != {net} {family} daddr {net} masquerade{fully}",
            ]
    return "\n".join(lines) + "\n"


def delete_nft_tables() -> list[str]:
    removed: list[str] = []
    if shutil.which("nft") is None:
        return removed
    for family, name in NFT_TABLES:
        if nft(f"delete table {family} {name}\n").returncode == 0:
            removed.append(f"nftables table {family} {name}")
    return removed


@dataclass(frozen=True)
class FamilyNetworks:
    """One address family's networks: the cluster Network, the own pod subnet, and those of the previous run."""

    cluster: Network
    pod: Network
    previous_cluster: Network | None = None
    previous_pod: Network | None = None


@dataclass
class TrafficRules:
    """The node's rule sets (IPv4 through iptables, IPv6 through ip6tables, or both through nft), installed at start
    and resynced; nothing is removed on exit (upstream)."""

    families: list[FamilyNetworks]
    masq: bool
    forward: bool
    nftables: bool
    fully_random_disabled: bool = False

    def __post_init__(self) -> None:
        if self.nftables:
            if shutil.which("nft") is None:
                raise RulesError("EnableNFTables is set but the nft binary was not found")
        else:
            self.tools = {
                f.cluster.version: Iptables("iptables" if f.cluster.version == 4 else "ip6tables")
                for f in self.families
            }
        self.rule_sets: list[tuple[Iptables, list[Rule]]] = []

    def setup(self) -> None:
        if self.nftables:
            self._clean_iptables_mode()
            fully = not self.fully_random_disabled and nft_supports_fully_random()
            result = nft(nft_script([(f.cluster, f.pod) for f in self.families], self.masq, self.forward, fully))
            if result.returncode != 0:
                raise RulesError(f"nft failed: {result.stderr.strip()}")
            return
        delete_nft_tables()  # the other mode's leftovers, as upstream
        for f in self.families:
            tool = self.tools[f.cluster.version]
            random_fully = tool.recent and not self.fully_random_disabled
            old_net, old_pod = f.previous_cluster, f.previous_pod
            if self.masq and old_net is not None and old_pod is not None and (old_net, old_pod) != (f.cluster, f.pod):
                stale = tool.delete(masq_rules(old_net, old_pod, random_fully) + masq_rules(old_net, old_pod, False))
                if stale:
                    log.info(
                        "Removed %d masquerade rules of the previous network %s / subnet %s",
                        len(stale),
                        old_net,
                        old_pod,
                    )
            rules = (masq_rules(f.cluster, f.pod, random_fully) if self.masq else []) + (
                forward_rules(f.cluster) if self.forward else []
            )
            if rules:
                tool.install(rules)
                self.rule_sets.append((tool, rules))

    def undo(self) -> list[str]:
        """After a failed start with a new lease: remove what setup() installed (cleanup's way: rules, then our
        chains or nft tables)."""
        if self.nftables:
            return delete_nft_tables()
        return [line for tool, rules in self.rule_sets for line in tool.remove_chains(rules)]

    def resync(self) -> None:
        """Put back what someone removed (iptables mode only, as upstream)."""
        for tool, rules in self.rule_sets:
            if tool.ensure(rules):
                log.warning("Some %s rules were missing; reinstalled the set", tool.binary)

    def _clean_iptables_mode(self) -> None:
        if shutil.which("iptables") is None:
            raise RulesError("failed to setup IPTables. iptables binary was not found")
        for binary in ("iptables", "ip6tables"):
            if shutil.which(binary) is None:
                continue
            for chain in ("FLANNEL-POSTRTG", "FLANNEL-FWD"):
                subprocess.run([binary, "-w", "-t", "nat", "-F", chain], capture_output=True, timeout=30)
