"""TLS on the data plane, bound to the peer's identity.

gRPC's TLS stack takes no Ed25519 keys in handshakes, so a peer serves with an ECDSA P-256 key of its own
(new at each start) in a self-signed certificate that carries, in one extension, the peer id and the
identity key's signature over the certificate's public key. The certificate travels in the peer's signed
DHT record (and, from the client, in each `Hop` a peer pushes to). A caller trusts exactly that certificate
for that peer, after checking that it `binds` to the peer id: a server at that address holding any other
key fails the handshake, and the caller fails over.

    identity (Ed25519) ──signs──▶ TLS public key (P-256) ◀── certificate (self-signed, pinned by callers)
"""

from __future__ import annotations

import datetime
import functools
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from protos import identity as identities
from protos.identity import Identity
from protos.records import MAX_CERTIFICATE_CHARS

TARGET_NAME = "corolla.peer"  # the name every peer certificate is issued to; callers verify against it
BINDING_OID = ObjectIdentifier("1.3.6.1.4.1.59999.7391.1")  # corolla's identity binding (private arc)
VALIDITY = datetime.timedelta(days=30)  # a peer makes a new certificate at each start
_SEPARATOR = b"\x00"


def _binding_payload(certificate_key: ec.EllipticCurvePublicKey) -> bytes:
    spki = certificate_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b"corolla-tls-binding-v1" + _SEPARATOR + spki


@dataclass(frozen=True)
class ServerTls:
    """A peer's TLS key and certificate (PEM)."""

    certificate: bytes
    private_key: bytes

    @classmethod
    def create(cls, identity: Identity) -> ServerTls:
        key = ec.generate_private_key(ec.SECP256R1())
        signature = identity.sign(_binding_payload(key.public_key()))
        binding = identity.peer_id.encode() + _SEPARATOR + signature
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TARGET_NAME)])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(TARGET_NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.UnrecognizedExtension(BINDING_OID, binding), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(
            certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.certificate)])


@functools.lru_cache(maxsize=1024)
def binds(certificate: bytes, peer_id: str) -> bool:
    """Whether `certificate` (PEM) is one that `peer_id`'s identity key vouched for."""
    if len(certificate) > MAX_CERTIFICATE_CHARS:
        return False
    try:
        parsed = x509.load_pem_x509_certificate(certificate)
        binding = parsed.extensions.get_extension_for_oid(BINDING_OID).value
        public_key = parsed.public_key()
    except Exception:  # anything unparseable binds nothing
        return False
    if not isinstance(binding, x509.UnrecognizedExtension) or not isinstance(
        public_key, ec.EllipticCurvePublicKey
    ):
        return False
    named, _, signature = binding.value.partition(_SEPARATOR)
    if named.decode(errors="replace") != peer_id:
        return False
    return identities.verify(peer_id, signature, _binding_payload(public_key))


def channel_credentials(certificate: bytes) -> grpc.ChannelCredentials:
    """Credentials that accept only the server holding `certificate`'s key."""
    return grpc.ssl_channel_credentials(root_certificates=certificate)


def channel_options() -> list[tuple[str, str]]:
    """The name every peer certificate carries (peers are reached by IP address)."""
    return [("grpc.ssl_target_name_override", TARGET_NAME)]
