"""TLS for every hop: PEM files → gRPC credentials, and a throwaway CA for a local stack. No JAX.

    tls = server_tls(cert, key, client_ca)       # `sdmesh serve --tls-cert/--tls-key [--tls-client-ca]`
    grpc_server.add_secure_port(address, tls.credentials())
    metrics.serve_http(port, host, tls=tls)      # /metrics over HTTPS with the same certificate
    channel_credentials(ca, cert, key)           # a client's side: trust `ca`, present `cert` (mutual TLS)
    make_local_certificates(directory, hosts)    # `sdmesh up --tls`: ca.pem, server.pem, client.pem and keys

With a client CA the server requires every client to present a certificate that CA signed (mutual
TLS): a client without one, or with one from another CA, fails at the handshake (UNAVAILABLE).
The files are read and checked when a service starts, so a wrong path or a certificate without its
key is an `InvalidRequest` naming the flag and the fix, not an opaque handshake failure later.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from sdmesh.services.inputs.errors import InvalidRequest

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")  # every local certificate is valid for these
LOCAL_VALIDITY = datetime.timedelta(days=7)  # throwaway certificates: a stack on one machine, for a while
CLOCK_SKEW = datetime.timedelta(minutes=5)  # valid from a little before now, for clocks slightly behind ours
# The files make_local_certificates writes, by role.
LOCAL_FILES = {
    "ca": "ca.pem",
    "server_cert": "server.pem",
    "server_key": "server-key.pem",
    "client_cert": "client.pem",
    "client_key": "client-key.pem",
}


@dataclasses.dataclass(frozen=True)
class ServerTLS:
    """A service's certificate and key, and the CA its clients' certificates must come from (None: any client)."""

    cert: Path
    key: Path
    client_ca: Path | None
    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_pem)], root_certificates=self.client_ca_pem, require_client_auth=self.mutual
        )

    def describe(self) -> str:
        """For the log: "TLS" or "mutual TLS (client certificates from CA)"."""
        return f"mutual TLS (client certificates from {self.client_ca})" if self.mutual else "TLS"


def _read_pem(path: Path | str, flag: str, marker: str, what: str) -> bytes:
    """The file's bytes; InvalidRequest naming the flag if it cannot be read or holds no `marker` PEM block."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InvalidRequest(f"{flag} {path}: cannot read it ({e.strerror or e}); give the path of {what}") from None
    if f"-----BEGIN {marker}".encode() not in data:
        raise InvalidRequest(f"{flag} {path}: not a PEM file holding {what} (no '-----BEGIN {marker}' line)")
    return data


def _read_cert(path: Path | str, flag: str) -> bytes:
    return _read_pem(path, flag, "CERTIFICATE", "a certificate")


def _read_key(path: Path | str, flag: str) -> bytes:
    data = _read_pem(path, flag, "", "a private key")
    if b"PRIVATE KEY-----" not in data:
        raise InvalidRequest(f"{flag} {path}: not a PEM private key (no '-----BEGIN ... PRIVATE KEY-----' line)")
    return data


def _check_pair(cert_pem: bytes, key_pem: bytes, cert_flag: str, key_flag: str) -> None:
    """The key must be the certificate's: else every handshake would fail, with a message naming neither file."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
    except ImportError:  # the light client: gRPC's own error will have to do
        return
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise InvalidRequest(f"{cert_flag}: not a readable PEM certificate ({e})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise InvalidRequest(
            f"{key_flag}: not a readable unencrypted PEM private key ({e}); "
            "decrypt it first (e.g. openssl pkey -in KEY -out KEY.plain)"
        ) from None
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    if cert.public_key().public_bytes(pem, raw) != key.public_key().public_bytes(pem, raw):
        raise InvalidRequest(f"{key_flag} is not the private key of {cert_flag}'s certificate; give the matching pair")


def server_tls(
    cert: Path | str | None,
    key: Path | str | None,
    client_ca: Path | str | None = None,
    *,
    flags: tuple[str, str, str] = ("--tls-cert", "--tls-key", "--tls-client-ca"),
) -> ServerTLS | None:
    """The files read and checked; None when none is given (plaintext). InvalidRequest naming the flag otherwise."""
    cert_flag, key_flag, ca_flag = flags
    if cert is None and key is None:
        if client_ca is not None:
            raise InvalidRequest(
                f"{ca_flag} checks clients' certificates, which needs TLS: give {cert_flag} and {key_flag} too"
            )
        return None
    if cert is None or key is None:
        raise InvalidRequest(f"give {cert_flag} and {key_flag} together (the server's certificate and its key)")
    cert_pem = _read_cert(cert, cert_flag)
    key_pem = _read_key(key, key_flag)
    _check_pair(cert_pem, key_pem, f"{cert_flag} {cert}", f"{key_flag} {key}")
    ca_pem = _read_cert(client_ca, ca_flag) if client_ca is not None else None
    return ServerTLS(
        Path(cert), Path(key), Path(client_ca) if client_ca is not None else None, cert_pem, key_pem, ca_pem
    )


def server_tls_from_args(args: Any) -> ServerTLS | None:
    """`sdmesh serve`'s --tls-cert, --tls-key, --tls-client-ca."""
    return server_tls(
        getattr(args, "tls_cert", None), getattr(args, "tls_key", None), getattr(args, "tls_client_ca", None)
    )


def channel_credentials(
    ca: Path | str | None,
    cert: Path | str | None = None,
    key: Path | str | None = None,
    *,
    flags: tuple[str, str, str] = ("--tls-ca", "--tls-cert", "--tls-key"),
) -> grpc.ChannelCredentials | None:
    """A client's TLS: trust `ca` (None: the system's roots), present `cert` and `key` (mutual TLS).

    None when no file is given (plaintext). InvalidRequest naming the flag for a file that cannot be read.
    """
    ca_flag, cert_flag, key_flag = flags
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise InvalidRequest(f"give {cert_flag} and {key_flag} together (a client certificate and its key)")
    cert_pem = _read_cert(cert, cert_flag) if cert is not None else None
    key_pem = _read_key(key, key_flag) if key is not None else None
    if cert_pem is not None and key_pem is not None:
        _check_pair(cert_pem, key_pem, f"{cert_flag} {cert}", f"{key_flag} {key}")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_cert(ca, ca_flag) if ca is not None else None,
        private_key=key_pem,
        certificate_chain=cert_pem,
    )


def stage_channel_credentials_from_args(args: Any) -> grpc.ChannelCredentials | None:
    """`sdmesh serve gateway`'s --stage-tls-ca, --stage-tls-cert, --stage-tls-key: how it reaches the stages."""
    return channel_credentials(
        getattr(args, "stage_tls_ca", None),
        getattr(args, "stage_tls_cert", None),
        getattr(args, "stage_tls_key", None),
        flags=("--stage-tls-ca", "--stage-tls-cert", "--stage-tls-key"),
    )


# --- a throwaway CA for a local stack -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LocalCertificates:
    """What `make_local_certificates` wrote: paths in one directory, named as LOCAL_FILES."""

    directory: Path
    ca: Path  # the CA certificate: every service and client trusts it
    server_cert: Path  # valid for the hosts, as a server and as a client (the gateway presents it to the stages)
    server_key: Path
    client_cert: Path  # a client's certificate (clientAuth only), e.g. for `sdmesh generate --server`
    client_key: Path

    @classmethod
    def at(cls, directory: Path | str) -> LocalCertificates:
        directory = Path(directory)
        return cls(directory, **{role: directory / name for role, name in LOCAL_FILES.items()})


def _san(hosts: Sequence[str]) -> list[Any]:
    from cryptography import x509

    names: list[Any] = []
    for host in dict.fromkeys([*LOCAL_HOSTS, *hosts]):  # ordered, without repeats
        host = host.strip("[]")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _key_usage(**allowed: bool) -> Any:
    """x509.KeyUsage with the named usages allowed and every other one not."""
    from cryptography import x509

    usages = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
              "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")  # fmt: skip
    return x509.KeyUsage(**{u: allowed.get(u, False) for u in usages})


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write `data` with permissions `mode` from the start: a key is never readable by others, not even briefly."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # a file that existed keeps its old mode through os.open


def make_local_certificates(
    directory: Path | str, hosts: Sequence[str] = (), *, validity: datetime.timedelta = LOCAL_VALIDITY
) -> LocalCertificates:
    """A new CA, a server certificate for 127.0.0.1, localhost, ::1 and `hosts` (IP or DNS names; it also
    serves as a client certificate), and a client certificate, written into `directory` (created if needed;
    files of the same names are replaced). Keys are mode 0600. Needs the `cryptography` package (serve extra).
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as e:
        raise InvalidRequest(
            f"making certificates needs the cryptography package ({e.name} is missing): pip install 'sdmesh[serve]'"
        ) from e
    files = LocalCertificates.at(directory)
    files.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sdmesh local"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])  # fmt: skip

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )

    # P-256 keys: quick to make, and every TLS stack we talk to (gRPC, Python's ssl, browsers) takes them.
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("sdmesh local CA")
    ca_cert = (
        builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())

    def leaf(common: str, usages: list[Any], hosts: Sequence[str] | None) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            builder(name(common), ca_name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(authority, critical=False)
        )
        if hosts is not None:
            cert = cert.add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
        return cert.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), key_pem(key)

    server_cert, server_key = leaf(
        "sdmesh server", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], hosts
    )
    client_cert, client_key = leaf("sdmesh client", [ExtendedKeyUsageOID.CLIENT_AUTH], None)
    _write(files.ca, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(files.server_cert, server_cert, 0o644)
    _write(files.server_key, server_key, 0o600)
    _write(files.client_cert, client_cert, 0o644)
    _write(files.client_key, client_key, 0o600)
    return files
