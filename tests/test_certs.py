"""`fedslm certs`: a CA, a SuperLink certificate a real flower-superlink serves TLS with, SuperNode keys."""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from fedslm.cli.main import app
from fedslm.deploy.certs import make_credentials
from fedslm.errors import ConfigError
from fedslm.simulation.simulate import free_port, stop_process_tree


def test_credentials_are_valid_and_private(tmp_path):
    creds = make_credentials(tmp_path / "c", ["127.0.0.1", "coordinator.example"], ["hospital-a", "hospital-b"])
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    link = x509.load_pem_x509_certificate(creds.superlink_cert.read_bytes())
    link.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = link.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coordinator.example" in san.get_values_for_type(x509.DNSName)
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for name, (priv, pub) in creds.institutions.items():
        key = load_ssh_private_key(priv.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert load_ssh_public_key(pub.read_bytes()).public_numbers() == key.public_key().public_numbers()
        assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "c" / "ca.key").stat().st_mode) == 0o600
    assert creds.enrolled.read_text().count("ecdsa-sha2-nistp384") == 2
    with pytest.raises(ConfigError, match="never overwritten"):
        make_credentials(tmp_path / "c", ["127.0.0.1"], [])
    with pytest.raises(ConfigError, match="must be letters"):
        make_credentials(tmp_path / "d", ["127.0.0.1"], ["../evil"])


def test_a_real_superlink_serves_tls_with_them_and_refuses_plain_text(tmp_path):
    creds = make_credentials(tmp_path / "c", ["127.0.0.1"], [])
    port = free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / ".flwr"),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "flower-superlink"), "--ssl-ca-certfile", str(creds.ca_cert),
         "--ssl-certfile", str(creds.superlink_cert), "--ssl-keyfile", str(creds.superlink_key),
         "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        ctx = ssl.create_default_context(cafile=str(creds.ca_cert))
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "flower-superlink exited"
            try:
                ok = httpx.get(f"https://127.0.0.1:{port}/health", verify=ctx, timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "SuperLink did not come up with TLS"
                time.sleep(0.5)
        assert ok.is_success
        with pytest.raises(httpx.HTTPError):  # a plain-text client gets no answer from a TLS SuperLink
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=3)
        with pytest.raises(httpx.HTTPError):  # nor does a client that does not trust our CA
            httpx.get(f"https://127.0.0.1:{port}/health", verify=ssl.create_default_context(), timeout=3)
    finally:
        stop_process_tree(proc)


def test_certs_cli(tmp_path):
    res = CliRunner().invoke(app, ["certs", "--out", str(tmp_path / "c"), "--superlink-host", "127.0.0.1",
                                   "-i", "hospital-a"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c" / "hospital-a" / "auth_key").exists()
    again = CliRunner().invoke(app, ["certs", "--out", str(tmp_path / "c"), "--superlink-host", "127.0.0.1"])
    assert again.exit_code == 2 and "never overwritten" in again.output
