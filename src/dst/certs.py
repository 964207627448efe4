"""``dst certs``: a certificate authority and certificates for a cluster.

Theory of operation
-------------------
``dst certs DIR NAME...`` keeps a CA in ``DIR/ca`` (``ca-cert.pem``, ``ca-key.pem``;
made on first use, reused after) and gives each NAME a directory ``DIR/NAME`` in the
layout nbdkit, qemu and libnbd read (see :mod:`dst.net.tls`)::

    DIR/NAME/ca-cert.pem                        the CA, to verify peers
    DIR/NAME/server-cert.pem server-key.pem     CN=NAME, for serving (--server-only)
    DIR/NAME/client-cert.pem client-key.pem     CN=NAME, for connecting (--client-only)

so one directory serves as ``--tls-certificates`` of ``dst serve``, nbdkit and
``qemu-nbd --object tls-creds-x509,dir=...``, and as ``tls-certificates=`` of an nbds
URI.  Subjects are ``CN=NAME,O=ORG`` (what access lists match); server certificates
name NAME, localhost, 127.0.0.1, ::1 and every ``--host`` as subject alternative
names.  Keys are ECDSA P-256, written owner-only (0600) in owner-only directories
(0700), never overwritten: an existing NAME is left alone unless ``--force``.

Certificates carry the extensions the strict checkers want (GnuTLS in qemu: key
usage with digital signature and key encipherment, a key purpose per side; the CA with
basic constraints and certificate signing).  The pure part is :func:`issue`, which
takes the validity window as values so tests can make expired certificates.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dst.errors import ConfigError
from dst.net.tls import CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY

CA_KEY = "ca-key.pem"
DEFAULT_DAYS = 3650
DEFAULT_ORG = "dst"
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class Authority:
    """A CA: its certificate and key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(cn: str, org: str) -> x509.Name:
    # Most significant first, so the RFC 4514 form reads CN=...,O=... (as qemu's authz).
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates; a leaf signs and (for qemu's GnuTLS check) enciphers."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def new_authority(
    *, name: str = "dst CA", org: str = DEFAULT_ORG, days: int = DEFAULT_DAYS
) -> Authority:
    """A self-signed CA valid from an hour ago for ``days``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = _name(name, org)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue(
    ca: Authority,
    name: str,
    *,
    server: bool,
    org: str = DEFAULT_ORG,
    hosts: Sequence[str] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> Issued:
    """A certificate ``CN=name,O=org`` signed by ``ca``: for a server (its names are
    ``name``, the loopback names and ``hosts``) or a client.  Valid from an hour ago
    for ten years unless ``not_before``/``not_after`` say otherwise."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    purpose = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name, org))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(hours=1))
        .not_valid_after(not_after or now + dt.timedelta(days=DEFAULT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if server:
        names = dict.fromkeys([name, *LOCAL_NAMES, *hosts])
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_alt_name(h) for h in names]), critical=False
        )
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


# --- files --------------------------------------------------------------------------


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only (0600 from the start)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o644)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def load_or_create_authority(root: Path, *, org: str = DEFAULT_ORG) -> tuple[Authority, bool]:
    """The CA in ``root/ca`` (created if missing); True when it was created.

    Raises ConfigError when the files are there but unusable."""
    d = root / "ca"
    cert_path, key_path = d / CA_CERT, d / CA_KEY
    if cert_path.exists() or key_path.exists():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"cannot load the CA: {e}", where=str(d)) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("the CA key is not an EC key", where=str(key_path))
        return Authority(cert, key), False
    ca = new_authority(name=f"{org} CA", org=org)
    _private_dir(d)
    write_private(key_path, key_pem(ca.key))
    write_public(cert_path, cert_pem(ca.cert))
    return ca, True


def write_identity(
    root: Path,
    ca: Authority,
    name: str,
    *,
    server: bool = True,
    client: bool = True,
    org: str = DEFAULT_ORG,
    hosts: Sequence[str] = (),
) -> Path:
    """``root/name`` with the CA certificate and the server and/or client pair."""
    d = root / name
    _private_dir(d)
    write_public(d / CA_CERT, cert_pem(ca.cert))
    pairs = [(server, True, SERVER_CERT, SERVER_KEY), (client, False, CLIENT_CERT, CLIENT_KEY)]
    for wanted, is_server, cert_file, key_file in pairs:
        if wanted:
            got = issue(ca, name, server=is_server, org=org, hosts=hosts)
            write_private(d / key_file, key_pem(got.key))
            write_public(d / cert_file, cert_pem(got.cert))
    return d


def check_name(name: str) -> str:
    if not name or name in ("ca", ".", "..") or "/" in name or len(name) > 64:
        raise ConfigError(f"bad name {name!r}: a file name other than 'ca', 1-64 characters")
    return name


def run(
    root: str,
    names: Sequence[str],
    *,
    hosts: Sequence[str] = (),
    org: str = DEFAULT_ORG,
    server: bool = True,
    client: bool = True,
    force: bool = False,
) -> int:
    """The ``dst certs`` command: print what was made.  Raises ConfigError."""
    base = Path(root)
    for name in names:
        check_name(name)
        if (base / name).exists() and not force:
            raise ConfigError(f"{base / name} exists (use --force to issue new certificates)")
    ca, created = load_or_create_authority(base, org=org)
    print(f"{'created' if created else 'using'} CA {base / 'ca' / CA_CERT}", flush=True)
    for name in names:
        d = write_identity(base, ca, name, server=server, client=client, org=org, hosts=hosts)
        kinds = " and ".join(k for k, on in (("server", server), ("client", client)) if on)
        print(f"{d}: {kinds} certificate for CN={name},O={org}", flush=True)
    return 0
