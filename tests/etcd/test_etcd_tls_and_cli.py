"""etcd over TLS with client certificates (openssl-made CA), bad TLS files and endpoints as one-line errors, and the
`leases` / `config put` commands against etcd."""

import os
import subprocess
import sys

import pytest

from flannel_udp.subnet.etcd.client import EtcdConfigError, channel_target, parse_endpoints
from testbed.etcdserver import EtcdCluster


def cli(*args):
    return subprocess.run([sys.executable, "-m", "flannel_udp", *args], capture_output=True, text=True, timeout=60)


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        cwd=d,
    )
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (d / f"{name}.ext").write_text(extension + "\n")
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.crt",
            cwd=d,
        )
    (d / "garbage.pem").write_text("not a certificate\n")
    return d


def test_leases_and_config_put_over_tls_with_client_certificates(pki, tmp_path):
    with EtcdCluster(
        extra_args=(
            "--cert-file",
            str(pki / "server.crt"),
            "--key-file",
            str(pki / "server.key"),
            "--trusted-ca-file",
            str(pki / "ca.crt"),
            "--client-cert-auth",
        ),
        client_scheme="https",
    ) as cluster:
        endpoint = cluster.endpoints
        tls = [
            "--etcd-endpoints",
            endpoint,
            "--etcd-cafile",
            str(pki / "ca.crt"),
            "--etcd-certfile",
            str(pki / "client.crt"),
            "--etcd-keyfile",
            str(pki / "client.key"),
        ]
        conf = tmp_path / "net-conf.json"
        conf.write_text('{"Network": "10.7.0.0/16"}')
        put = cli("config", "put", str(conf), *tls)
        assert put.returncode == 0, put.stderr
        assert "stored" in put.stdout and "/coreos.com/network/config" in put.stdout
        listing = cli("leases", *tls)
        assert listing.returncode == 0 and listing.stdout.startswith("SUBNET"), listing.stderr
        # Without a client certificate the server refuses: one line, status 1, no traceback.
        plain = cli("leases", "--etcd-endpoints", endpoint)
        assert plain.returncode == 1 and plain.stderr.strip().splitlines()[-1].startswith("error: etcd at 127.0.0.1:")
        assert "Traceback" not in plain.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--etcd-certfile", "/nonexistent.crt", "--etcd-keyfile", "/nonexistent.key"],
            "error: cannot read etcd key file /nonexistent.key: No such file or directory",
        ),
        (
            ["--etcd-certfile", "{pki}/garbage.pem", "--etcd-keyfile", "{pki}/client.key"],
            "error: etcd certificate {pki}/garbage.pem and key {pki}/client.key do not load",
        ),
        (
            [
                "--etcd-certfile",
                "{pki}/client.crt",
                "--etcd-keyfile",
                "{pki}/client.key",
                "--etcd-cafile",
                "{pki}/garbage.pem",
            ],
            "error: etcd CA file {pki}/garbage.pem holds no usable certificate",
        ),
        (
            ["--etcd-certfile", "{pki}/client.crt", "--etcd-keyfile", "{pki}/server.key"],
            "error: etcd certificate {pki}/client.crt and key {pki}/server.key do not load",
        ),
    ],
)
def test_bad_tls_files_end_in_one_line(pki, flags, message, tmp_path):
    flags = [f.format(pki=pki) for f in flags]
    result = cli(
        "run", "--etcd-endpoints", "https://127.0.0.1:1", *flags, "--subnet-file", str(tmp_path / "subnet.env")
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(message.format(pki=pki)), result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "subnet.env")


def test_bad_endpoint_is_one_line(tmp_path):
    result = cli("run", "--etcd-endpoints", "ftp://127.0.0.1:2379", "--subnet-file", str(tmp_path / "s.env"))
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1]
        == "error: invalid etcd endpoint 'ftp://127.0.0.1:2379': expected http(s)://host:port"
    )


def test_endpoint_lists_become_one_grpc_target():
    assert (
        channel_target(parse_endpoints("http://127.0.0.1:4001,http://127.0.0.1:2379"))
        == "ipv4:127.0.0.1:4001,127.0.0.1:2379"
    )
    assert (
        channel_target(parse_endpoints("https://[fd00::1]:2379,https://[fd00::2]:2379"))
        == "ipv6:[fd00::1]:2379,[fd00::2]:2379"
    )
    assert channel_target(parse_endpoints("http://etcd.example:2379")) == "etcd.example:2379"
    assert channel_target(parse_endpoints("10.0.0.1")) == "10.0.0.1:2379"
    with pytest.raises(EtcdConfigError):
        parse_endpoints(" , ")
    with pytest.raises(EtcdConfigError):
        parse_endpoints("http://10.0.0.1:notaport")
