"""Institution identities in SecAgg+: each node signs its round keys, each node checks its neighbours'.

Flower's SecAgg+ has no identities: every node makes two fresh key pairs per round and the
coordinator relays the public halves. A coordinator can therefore put into one node's cohort any
number of neighbours it made up itself (it holds their secret keys): with every neighbour but the
victim its own, it learns the victim's pairwise masks and the shares of its self-mask seed, and
unmasks the victim's update alone.

fedslm closes this with long-term institution keys (Ed25519), made once per institution with
``fedslm node keygen`` and exchanged out of band, the way the institutions agree on the federation
itself. In the setup stage a node signs

    "fedslm-secagg-identity-v1" | run id | round (the message's group id) | its node id | pk1 | pk2

and adds the signature and its public key to its reply (:data:`IDENTITY`); the coordinator relays
each neighbour's signed identity beside its public keys in the share-keys stage (:data:`PEERS`).
A node checks every neighbour's signature against the institutions its policy lists
(``secure_aggregation.peers``) before it encrypts a single share to them, and refuses a cohort
with more unverified neighbours than ``secure_aggregation.max_unverified_share`` allows, or one
institution's key on two nodes. A coordinator cannot sign for a listed institution, cannot move a
signed key to another node id, run or round, and gains nothing from replaying one (it does not
hold the secret keys behind it).

Signed keys alone do not stop a coordinator that tells different nodes different stories about who
dropped out (it withholds some neighbours' shares from a victim, then asks the others for the
victim's mask seed and for those neighbours' keys). fedslm therefore adds a consistency stage
between Flower's collect and unmask stages (Bonawitz et al. 2017, section 4.4): the coordinator
sends every surviving node the list of nodes whose masked vectors it holds, each node checks it
against the neighbours it masked with and signs

    "fedslm-secagg-consistency-v1" | run id | round | its node id | the sorted survivor list

once per round (:data:`CONSISTENCY`), and a node answers the unmask stage only for that list and
only when more than half of the institutions its policy lists signed the same one. A colluding
institution signs every list, so against c of them (policy ``secure_aggregation.max_colluding``) the
majority counts c on both sides, and the threshold t of n shares must satisfy 2t > n + c.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedslm.errors import FedslmError

# The setup reply's record: this node's public identity key and its signature over its round keys.
IDENTITY = "fedslm-secagg-identity"
# The share-keys message's record: {neighbour node id: [public identity key, signature]}.
PEERS = "fedslm-secagg-peers"
# The consistency stage's reply, and the unmask message's record: the survivor list and
# {node id: [public identity key, signature over the list]}.
CONSISTENCY = "fedslm-secagg-consistency"
SURVIVORS = "survivors"
KEY = "key"
SIGNATURE = "signature"
# What a node signs beside its keys (:func:`setup_statement`) or its survivor list (:func:`noise_statement`).
STATEMENT = "statement"
_DOMAIN = b"fedslm-secagg-identity-v1\x00"
_CONSISTENCY_DOMAIN = b"fedslm-secagg-consistency-v1\x00"
RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class IdentityError(FedslmError):
    pass


def signed_bytes(run_id: int, group_id: str, node_id: int, pk1: bytes, pk2: bytes, extra: bytes = b"") -> bytes:
    """What a node signs: its two round public keys, bound to the run, the round and its node id; with
    ``extra`` (:func:`setup_statement`) also the protocol it accepted and what it promises to check."""
    group = group_id.encode("utf-8")
    parts = [_DOMAIN, struct.pack(">QQ", int(run_id) & (2**64 - 1), int(node_id) & (2**64 - 1)),
             struct.pack(">I", len(group)), group, struct.pack(">I", len(pk1)), pk1, struct.pack(">I", len(pk2)), pk2]
    if extra:
        parts += [struct.pack(">I", len(extra)), extra]
    return b"".join(parts)


_SETUP_DOMAIN = b"fedslm-setup-v1\x00"


def setup_statement(*, checks: bool, threshold: int, shares: int, sample: int, colluding: int, listed: str) -> bytes:
    """Signed with a node's round keys: the protocol it accepted (threshold, shares, cohort), the colluders it
    guards against, the institutions it lists (:func:`listed_digest`), and whether it checks every plan of
    distributed noise in a sum before it unmasks. A node's secrets are safe only if its neighbours, who hold
    them, enforce at least its bounds: a coordinator could otherwise give honest nodes different thresholds
    or collusion bounds and win a majority among the laxer ones."""
    body = {"checks": bool(checks), "t": int(threshold), "n": int(shares), "s": int(sample), "c": int(colluding),
            "listed": str(listed)}
    return _SETUP_DOMAIN + json.dumps(body, sort_keys=True).encode()


def read_setup_statement(raw: bytes) -> Optional[dict]:
    """The fields of a setup statement, or None if ``raw`` is not one."""
    if not raw.startswith(_SETUP_DOMAIN):
        return None
    try:
        body = json.loads(raw[len(_SETUP_DOMAIN):].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("checks"), bool) or not isinstance(body.get("listed"), str):
        return None
    if not all(isinstance(body.get(k), int) and not isinstance(body.get(k), bool) for k in ("t", "n", "s", "c")):
        return None
    return body


def listed_digest(raw_keys) -> str:
    """The institutions a node lists (its own key among them), as one value neighbours can compare."""
    import hashlib

    return hashlib.sha256(b"".join(sorted(bytes(k) for k in raw_keys))).hexdigest()


def survivors_bytes(run_id: int, group_id: str, node_id: int, survivors: list[int], noise: bytes = b"") -> bytes:
    """What a node signs in the consistency stage: the survivor list, bound to the run, the round and its node id;
    under distributed noise also its ``noise`` statement (:func:`noise_statement`)."""
    group = group_id.encode("utf-8")
    nodes = sorted(int(n) & (2**64 - 1) for n in survivors)
    parts = [_CONSISTENCY_DOMAIN, struct.pack(">QQ", int(run_id) & (2**64 - 1), int(node_id) & (2**64 - 1)),
             struct.pack(">I", len(group)), group, struct.pack(">I", len(nodes)), struct.pack(f">{len(nodes)}Q", *nodes)]
    if noise:
        parts += [struct.pack(">I", len(noise)), noise]
    return b"".join(parts)


_NOISE_DOMAIN = b"fedslm-noise-v1\x00"


def noise_statement(lattice: str, share: float, need: float, honest: int) -> bytes:
    """A node's statement, signed with the survivor list, of the distributed noise it added: the lattice and
    the tensors on it (:meth:`fedslm.privacy.distributed.Lattice.digest`), its share of the variance in that
    lattice's units, the variance its plan needs in the sum, and the honest contributors it counts on, so that
    its neighbours can check its condition too (they hold the shares that would unmask it)."""
    body = {"lattice": lattice, "share": float(share), "need": float(need), "honest": int(honest)}
    return _NOISE_DOMAIN + json.dumps(body, sort_keys=True).encode()


def read_noise_statement(raw: bytes) -> Optional[tuple[str, float, float, int]]:
    """(lattice, share, need, honest) of a statement, or None if it is not one."""
    if not raw.startswith(_NOISE_DOMAIN):
        return None
    try:
        body = json.loads(raw[len(_NOISE_DOMAIN):].decode("utf-8"))
        lattice, share, need, honest = body["lattice"], body["share"], body["need"], body["honest"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None
    if not isinstance(lattice, str) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (share, need)):
        return None
    try:
        share, need = float(share), float(need)  # a 300-digit integer is past float range
    except OverflowError:
        return None
    if not all(math.isfinite(v) and v >= 0 for v in (share, need)):
        return None
    if isinstance(honest, bool) or not isinstance(honest, int) or not 1 <= honest <= 10_000:
        return None
    return lattice, float(share), float(need), int(honest)


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(*RAW)


def fingerprint(raw: bytes) -> str:
    """A short, human-comparable name of a public identity key (for logs and ``fedslm node keygen``)."""
    import hashlib

    digest = hashlib.sha256(raw).hexdigest()[:24]
    return ":".join(digest[i:i + 4] for i in range(0, 24, 4))


def generate(path: str | Path) -> tuple[Path, Path]:
    """Write a new identity: the private key at ``path`` (0600) and the public key at ``path``.pub."""
    path = Path(path).expanduser()
    public = path.with_name(path.name + ".pub")
    if path.exists():
        raise IdentityError(f"{path} exists; an institution keeps one identity (delete it first to make another)")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return path, public


def load_private(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise IdentityError(f"cannot read the identity key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} is not an Ed25519 key (make one with: fedslm node keygen {path})")
    return key


def load_public(path: str | Path) -> bytes:
    """The raw 32-byte public key in the PEM file at ``path``."""
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise IdentityError(f"cannot read the public identity key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError(f"{path} is not an Ed25519 public key")
    return raw_public(key)


def sign(key: Ed25519PrivateKey, message: bytes) -> tuple[bytes, bytes]:
    """(raw public key, signature) for ``message``."""
    return raw_public(key.public_key()), key.sign(message)


def verify(raw_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(raw_key).verify(signature, message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
