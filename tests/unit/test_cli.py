"""Command-line behaviour a user sees: flanneld flag syntax, env vars, one-line errors with exit status 1."""

import subprocess
import sys

import pytest

from flannel_udp.cli import RUN_FLAGS, UsageError, apply_env, build_run_parser, normalise_go_flags


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "flannel_udp", *args], capture_output=True, text=True, timeout=30, env=env
    )


def parse(argv):
    normalised, given = normalise_go_flags(argv, set(RUN_FLAGS))
    return build_run_parser("t").parse_args(normalised), given


def test_go_style_flags():
    args, given = parse(
        [
            "-iface=eth0",
            "-iface",
            "eth1",
            "--subnet-file",
            "/x",
            "-ip-masq",
            "-iptables-forward-rules=false",
            "-healthz-port=8081",
            "-udp-source-check=false",
        ]
    )
    assert args.iface == ["eth0", "eth1"] and args.subnet_file == "/x" and args.ip_masq
    assert not args.iptables_forward_rules and args.healthz_port == 8081 and not args.udp_source_check
    assert {"iface", "subnet-file", "ip-masq"} <= given
    with pytest.raises(UsageError):
        parse(["-ip-masq=maybe"])


@pytest.mark.parametrize("value", ["1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"])
def test_booleans_are_read_as_gos_parsebool_reads_them(value, monkeypatch):
    truth = value in ("1", "t", "T", "TRUE", "true", "True")
    args, _ = parse([f"-ip-masq={value}"])
    assert args.ip_masq is truth
    monkeypatch.setenv("FLANNELD_IP_MASQ", value)
    args, given = parse([])
    apply_env(args, given)
    assert args.ip_masq is truth


@pytest.mark.parametrize("value", ["tRuE", "yes", "on", "TRue", "fALSE", " true", "2"])
def test_booleans_go_refuses_are_refused(value, monkeypatch):
    with pytest.raises(UsageError, match=f"invalid boolean value '{value}' for -ip-masq"):
        parse([f"-ip-masq={value}"])
    monkeypatch.setenv("FLANNELD_IP_MASQ", value)
    args, given = parse([])
    apply_env(args, given)  # logged and skipped, as upstream's flag package reports it
    assert args.ip_masq is False


def test_env_fills_only_flags_not_given(monkeypatch):
    monkeypatch.setenv("FLANNELD_IFACE", "eth7,eth8")
    monkeypatch.setenv("FLANNELD_SUBNET_FILE", "/from/env")
    monkeypatch.setenv("FLANNELD_IP_MASQ", "true")
    monkeypatch.setenv("FLANNELD_HEALTHZ_PORT", "notanumber")
    args, given = parse(["-subnet-file=/from/flag"])
    apply_env(args, given)
    assert args.iface == ["eth7,eth8"] and args.subnet_file == "/from/flag" and args.ip_masq and args.healthz_port == 0


def test_version_goes_to_stderr():
    r = cli("run", "-version")
    assert r.returncode == 0 and r.stderr.strip() == "0.1.0" and r.stdout == ""


def test_help_exits_zero():
    assert cli("run", "-h").returncode == 0
    assert cli("--help").returncode == 0


def test_unknown_flag_is_one_line_exit_1():
    r = cli("run", "-no-such-flag")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "-no-such-flag" in r.stderr


def test_missing_net_conf_is_one_line_exit_1(tmp_path):
    r = cli("run", f"-net-config-path={tmp_path}/absent.json", "--iface", "no-such-iface0")
    assert r.returncode == 1
    assert (
        r.stderr.strip().splitlines()[-1]
        == f"error: failed to read net conf {tmp_path}/absent.json: No such file or directory"
    )


def test_invalid_net_conf_names_the_problem(tmp_path):
    conf = tmp_path / "net-conf.json"
    conf.write_text('{"Network": "10.3.0.0/16", "SubnetLen": 17}')
    r = cli("run", f"-net-config-path={conf}")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].endswith("network must be able to accommodate at least four subnets")


def test_renew_margin_is_checked():
    r = cli("run", "-subnet-lease-renew-margin=1440")
    assert r.returncode == 1 and "subnet-lease-renew-margin" in r.stderr


def test_config_check_prints_derived_values(tmp_path):
    conf = tmp_path / "net-conf.json"
    conf.write_text('{"Network": "10.244.0.0/16", "Backend": {"Type": "UDP"}}')
    r = cli("config", "check", str(conf))
    assert r.returncode == 0
    lines = dict(line.split(":", 1) for line in r.stdout.splitlines())
    assert {k: v.strip() for k, v in lines.items()} == {
        "Network": "10.244.0.0/16",
        "SubnetLen": "24",
        "SubnetMin": "10.244.1.0",
        "SubnetMax": "10.244.255.0",
        "Subnets": "255",
        "Backend": "udp",
    }


def test_config_check_errors(tmp_path):
    conf = tmp_path / "bad.json"
    conf.write_text('{"Network": "10.5.0.0/29"}')
    r = cli("config", "check", str(conf))
    assert (
        r.returncode == 1
        and r.stderr.strip() == f"error: {conf}: network is too small. Minimum useful network prefix is /28"
    )
    r = cli("config", "check", str(tmp_path / "absent.json"))
    assert r.returncode == 1 and "No such file or directory" in r.stderr


def test_leases_without_a_file(tmp_path):
    r = cli("leases", "--lease-file", str(tmp_path / "none.db"))
    assert r.returncode == 1 and "no lease file" in r.stderr


@pytest.mark.parametrize(
    "flag, value, low, high",
    [
        ("-healthz-port", "99999", 0, 65535),
        ("-healthz-port", "-1", 0, 65535),
        ("-iptables-resync", "0", 1, 86400),
        ("-udp-priority", "100", 0, 99),
        ("-udp-busy-poll", "1001", 0, 1000),
    ],
)
def test_numeric_flags_out_of_range_are_one_line(flag, value, low, high):
    r = cli("run", f"{flag}={value}")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"error: {flag} must be from {low} to {high}, got {value}"
