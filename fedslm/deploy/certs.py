"""Credentials for a real federation, made with the ``cryptography`` package (no openssl shell-out).

* a certificate authority (``ca.crt``, ``ca.key``) that institutions trust;
* the SuperLink's TLS certificate, its address in the subjectAltName
  (``superlink.crt``, ``superlink.key``);
* per institution, a SuperNode authentication key pair in OpenSSH format on
  NIST P-384 (``<name>/auth_key``, ``<name>/auth_key.pub``), which Flower's
  ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode
  register`` read;
* ``enrolled_public_keys.csv``: every institution's public key, one per
  line with its name, the list a coordinator enrols.

Private keys are written with mode 0600 and never overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedslm.errors import ConfigError


@dataclass(frozen=True)
class Credentials:
    folder: Path
    ca_cert: Path
    superlink_cert: Path
    superlink_key: Path
    institutions: dict[str, tuple[Path, Path]]  # name -> (private key, public key)
    enrolled: Path


def _write(path: Path, data: bytes, *, private: bool) -> None:
    if path.exists():
        raise ConfigError(f"{path} already exists; credentials are never overwritten (choose another --out)")
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(address: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(address))
    except ValueError:
        return x509.DNSName(address)


def _check_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise ConfigError(f"institution name {name!r} must be letters, digits, '-', '_' or '.'")
    return name


def make_credentials(folder: str | Path, superlink_hosts: Sequence[str], institutions: Sequence[str],
                     days: int = 365) -> Credentials:
    """Create a CA, the SuperLink certificate for ``superlink_hosts`` and one key pair per institution."""
    if not superlink_hosts:
        raise ConfigError("--superlink-host needs at least one address or host name (e.g. 127.0.0.1)")
    if len(set(institutions)) != len(institutions):
        raise ConfigError(f"institution names must be distinct, got {list(institutions)}")
    if days < 1:
        raise ConfigError(f"--days must be >= 1, got {days}")
    names = [_check_name(n) for n in institutions]
    folder = Path(folder)
    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedslm federation CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    link_key = ec.generate_private_key(ec.SECP384R1())
    link_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, superlink_hosts[0])]))
        .issuer_name(ca_name).public_key(link_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in superlink_hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    creds = Credentials(folder, folder / "ca.crt", folder / "superlink.crt", folder / "superlink.key", {},
                        folder / "enrolled_public_keys.csv")
    _write(creds.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(folder / "ca.key", _pem_key(ca_key), private=True)
    _write(creds.superlink_cert, link_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(creds.superlink_key, _pem_key(link_key), private=True)
    lines = []
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())
        priv = folder / name / "auth_key"
        pub = folder / name / "auth_key.pub"
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()), private=True)
        _write(pub, public + f" {name}\n".encode(), private=False)
        creds.institutions[name] = (priv, pub)
        lines.append(f"{name},{public.decode()}")
    _write(creds.enrolled, ("\n".join(lines) + "\n").encode() if lines else b"", private=False)
    return creds
