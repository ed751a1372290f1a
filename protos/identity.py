"""A node's identity: one Ed25519 key, kept in a libp2p key file that p2pd also reads, so the DHT peer id,
the signatures on the node's records and (later) its TLS certificate all belong to the same key.

The peer id is the libp2p "identity multihash" of the public key (`12D3KooW...`): anyone holding a peer id
can recover the public key from it and check what that peer signed, with no key distribution at all.
"""

from __future__ import annotations

import argparse
import atexit
import ipaddress
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

from protos.errors import CorollaError

logger = logging.getLogger(__name__)

_MULTIHASH_IDENTITY = b"\x00"  # multihash code 0x00: the digest is the key itself
_PUBLIC_KEY_MESSAGE_BYTES = 36  # crypto_pb2.PublicKey(Ed25519, 32 bytes) serialized


class IdentityError(CorollaError):
    """An identity file that cannot be used (unreadable, not an Ed25519 key, too open permissions)."""


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def peer_id_of(public_key: Ed25519PublicKey) -> str:
    """The libp2p peer id (base58) of an Ed25519 public key."""
    message = crypto_pb2.PublicKey(key_type=crypto_pb2.Ed25519, data=_raw_public(public_key))
    encoded = message.SerializeToString()
    return PeerID(_MULTIHASH_IDENTITY + bytes([len(encoded)]) + encoded).to_base58()


def public_key_of(peer_id: str) -> Ed25519PublicKey | None:
    """The Ed25519 public key a peer id embeds; None for anything else (an RSA id, garbage)."""
    try:
        raw = PeerID.from_base58(peer_id).to_bytes()
    except Exception:  # base58 errors vary: any undecodable id is simply not an Ed25519 id
        return None
    if len(raw) != 2 + _PUBLIC_KEY_MESSAGE_BYTES or raw[:2] != _MULTIHASH_IDENTITY + bytes(
        [_PUBLIC_KEY_MESSAGE_BYTES]
    ):
        return None
    try:
        message = crypto_pb2.PublicKey.FromString(raw[2:])
    except Exception:  # a malformed protobuf
        return None
    if message.key_type != crypto_pb2.Ed25519 or len(message.data) != 32:
        return None
    return Ed25519PublicKey.from_public_bytes(message.data)


def verify(peer_id: str, signature: bytes, payload: bytes) -> bool:
    """Whether `signature` over `payload` was made by the key of `peer_id`."""
    key = public_key_of(peer_id)
    if key is None:
        return False
    try:
        key.verify(signature, payload)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """A private key, its peer id, and the key file p2pd is started with."""

    private_key: Ed25519PrivateKey
    path: Path

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.private_key.public_key())

    def sign(self, payload: bytes) -> bytes:
        return self.private_key.sign(payload)

    @classmethod
    def load_or_create(cls, path: Path | None) -> Identity:
        """The identity in `path`, created there (mode 0600) when missing; without a path, a new identity
        for this process only (a fresh peer id each start), in a private temporary folder."""
        if path is None:
            folder = Path(tempfile.mkdtemp(prefix="corolla-identity-"))  # mode 0700
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            return cls._create(folder / "identity.key")
        path = Path(path)
        if path.exists():
            return cls._load(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        identity = cls._create(path)
        logger.info("identity created path=%s peer_id=%s", path, identity.peer_id)
        return identity

    @classmethod
    def _create(cls, path: Path) -> Identity:
        key = Ed25519PrivateKey.generate()
        seed = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        # libp2p's Ed25519 private key bytes: the 32-byte seed, then the 32-byte public key
        message = crypto_pb2.PrivateKey(
            key_type=crypto_pb2.Ed25519, data=seed + _raw_public(key.public_key())
        )
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(message.SerializeToString())
        return cls(key, path)

    @classmethod
    def _load(cls, path: Path) -> Identity:
        problem = private_file_problem(path)
        if problem is not None:
            raise IdentityError(f"identity file {problem}")
        try:
            message = crypto_pb2.PrivateKey.FromString(path.read_bytes())
        except Exception as e:  # a truncated or foreign file
            raise IdentityError(f"identity file {path} is not a libp2p private key: {e}") from None
        if message.key_type != crypto_pb2.Ed25519 or len(message.data) != 64:
            raise IdentityError(
                f"identity file {path} does not hold an Ed25519 key (an RSA key from an older corolla?): "
                "move it away and a new one is created"
            )
        key = Ed25519PrivateKey.from_private_bytes(message.data[:32])
        if _raw_public(key.public_key()) != message.data[32:]:
            raise IdentityError(f"identity file {path} is corrupt: its public key does not match")
        return cls(key, path)


def private_file_problem(path: Path, *, euid: int | None = None) -> str | None:
    """Why `path` is too open to hold a private key (a sentence starting with the path), or None.

    As PostgreSQL rules its key files: a file this user owns must be readable by this user alone (0600); a
    file root owns, which this user reads through its group, may be group-readable too (0640 at most). That
    is how Kubernetes mounts a Secret for a pod with `fsGroup` (root, group fsGroup, 0440) and how an admin
    hands a key to a service account. Nobody else may ever read it.
    """
    status = path.stat()
    euid = os.geteuid() if euid is None else euid
    if status.st_uid == 0 and euid != 0:
        if status.st_mode & 0o037:
            return f"{path} is readable by others: chmod 640 {path} (or 600)"
        return None
    if status.st_mode & 0o077:
        return f"{path} is readable by others: chmod 600 {path}"
    return None


def multiaddress(host: str, port: int, peer_id: str) -> str:
    """The multiaddress others pass as `--initial-peers` to reach `peer_id` at host:port: /ip4/ or /ip6/ for
    an address, /dns4/ for a name (a compose service, a Kubernetes Service)."""
    try:
        version = ipaddress.ip_address(host.strip("[]")).version
    except ValueError:
        return f"/dns4/{host}/tcp/{port}/p2p/{peer_id}"
    return f"/ip{version}/{host.strip('[]')}/tcp/{port}/p2p/{peer_id}"


def peer_id_main(argv: Sequence[str], prog: str) -> int:
    """`corolla peer-id --identity FILE [--host H --port P]`: the peer id a node started with that identity
    has (its multiaddress at H:P), computed offline from the file."""
    from protos.cli import add_log_level, emit  # the command table imports this module lazily: no cycle

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Print the peer id of the node whose identity is in FILE (what `corolla dht --identity "
        "FILE` or `corolla serve --identity FILE` announces), or with --host and --port the multiaddress "
        "that peers pass as --initial-peers; offline, from the file alone.",
    )
    parser.add_argument("--identity", metavar="FILE", type=Path, required=True, help="the identity file")
    parser.add_argument(
        "--create",
        action="store_true",
        help="create FILE (mode 0600) when it is missing, as the node would at its first start",
    )
    parser.add_argument("--host", help="the name or address the node is reached at")
    parser.add_argument("--port", type=int, help="the node's DHT port (`corolla dht --port`)")
    parser.add_argument(
        "--output", metavar="FILE", type=Path, help="also write the result to FILE (replaced atomically)"
    )
    add_log_level(parser)
    args = parser.parse_args(list(argv))
    if (args.host is None) != (args.port is None):
        parser.error("--host and --port go together")
    if not args.create and not args.identity.exists():
        parser.exit(1, f"{prog}: no identity file {args.identity} (--create makes one)\n")
    try:
        identity = Identity.load_or_create(args.identity)
    except (IdentityError, OSError) as e:
        parser.exit(1, f"{prog}: {e}\n")
    result = identity.peer_id if args.host is None else multiaddress(args.host, args.port, identity.peer_id)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=args.output.parent, delete=False, suffix=".tmp") as file:
            file.write(result + "\n")
        os.chmod(file.name, 0o644)  # public: a peer id is no secret
        os.replace(file.name, args.output)
    emit(result)
    return 0
