"""Test certificates: a throwaway CA that issues server and client certificates as PEM files.

Import as ``from tls_support import TestCA, CertFiles`` (``tests/`` is on ``sys.path`` under
pytest, see ``tests/backends.py``); the ``tls_ca`` and ``other_ca`` fixtures in
``tests/conftest.py`` make one per test.

Every key is EC P-256: making one takes well under a millisecond, so each test can have its
own CA and nothing is shared between tests. A certificate's files are named after it
(``<dir>/<name>.crt`` and ``<name>.key``), so issuing the same name again replaces the files
in place with a new certificate (new key, new serial): that is how reload tests rotate a
certificate before they SIGHUP the proxy. Each file is replaced atomically (written beside it,
then renamed), so a reader never sees half a PEM file; the certificate is written before its
key, so a reader between the two renames sees a pair that does not match.

The extensions are the ones strict verifiers insist on (Python 3.13's ``VERIFY_X509_STRICT``,
Go's crypto/x509, BoringSSL in grpcio): a critical basicConstraints, keyUsage, the key
identifiers, extendedKeyUsage on leaves, and SANs (hostname checks ignore the CN).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Leaves are short-lived and CAs long-lived; both start an hour back so that a clock a little
# behind the one that signed (a container, a VM) does not see a "not yet valid" certificate.
CA_LIFETIME = datetime.timedelta(days=3650)
LEAF_LIFETIME = datetime.timedelta(days=2)
CLOCK_SKEW = datetime.timedelta(hours=1)
# What `expired=True` means: valid for a day that ended a day ago.
EXPIRED_AGO = datetime.timedelta(days=1)

PrivateKey = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its key as PEM files, and the CA file that verifies it.

    ``cert`` holds the leaf, followed by its issuers when it was issued with ``chain=True``.
    ``ca`` is the root of the CA that issued it: the file a peer trusts (``--cacert``,
    ``root_certificates``, ``tls_client_ca``).
    """

    cert: Path
    key: Path
    serial: int
    ca: Path

    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()

    def key_pem(self) -> bytes:
        return self.key.read_bytes()

    def ca_pem(self) -> bytes:
        return self.ca.read_bytes()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _validity(
    expired: bool, not_before: datetime.datetime | None, not_after: datetime.datetime | None
) -> tuple[datetime.datetime, datetime.datetime]:
    now = _now()
    if expired:
        default_after = now - EXPIRED_AGO
        default_before = default_after - datetime.timedelta(days=1)
    else:
        default_before, default_after = now - CLOCK_SKEW, now + LEAF_LIFETIME
    return not_before or default_before, not_after or default_after


class TestCA:
    """A certificate authority that lives in one directory and issues leaves into it.

    Make one with :meth:`create` (a self-signed root) or :meth:`intermediate` (signed by this
    one). ``ca_pem`` is this CA's own certificate; ``root_pem`` the root at the top of its
    chain, which is what peers trust.
    """

    # Not a test class, although its name starts with "Test" (pytest would try to collect it
    # in every test module that imports it, and warn, which this project makes an error).
    __test__ = False

    def __init__(
        self,
        dir: Path,
        name: str,
        key: PrivateKey,
        cert: x509.Certificate,
        parents: tuple[x509.Certificate, ...],
        root_pem: Path,
    ) -> None:
        self.dir = dir
        self.name = name
        self.key = key
        self.cert = cert
        # The issuers above this CA, nearest first, ending with the root (empty for a root).
        self.parents = parents
        self.ca_pem = dir / f"{name}.crt"
        self.root_pem = root_pem

    @classmethod
    def create(cls, dir: Path, name: str = "test-ca") -> TestCA:
        """A self-signed root CA; writes ``<dir>/<name>.crt`` (and ``.key``)."""
        dir.mkdir(parents=True, exist_ok=True)
        key = _new_key()
        now = _now()
        cert = cls._ca_builder(_name(name), _name(name), key, key, now).sign(key, hashes.SHA256())
        ca = cls(dir, name, key, cert, (), dir / f"{name}.crt")
        ca._write_own_files()
        return ca

    def intermediate(self, name: str = "test-intermediate-ca") -> TestCA:
        """A CA signed by this one, in the same directory; its leaves chain up to our root."""
        key = _new_key()
        cert = self._ca_builder(_name(name), self.cert.subject, key, self.key, _now()).sign(
            self.key, hashes.SHA256()
        )
        ca = TestCA(self.dir, name, key, cert, (self.cert, *self.parents), self.root_pem)
        ca._write_own_files()
        return ca

    @staticmethod
    def _ca_builder(
        subject: x509.Name,
        issuer: x509.Name,
        key: PrivateKey,
        issuer_key: PrivateKey,
        now: datetime.datetime,
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
        )

    def _write_own_files(self) -> None:
        _write_atomically(self.ca_pem, _pem(self.cert))
        _write_atomically(self.dir / f"{self.name}.key", _key_pem(self.key), 0o600)

    def issue_server(
        self,
        name: str,
        dns: Sequence[str] = ("localhost",),
        ips: Sequence[str] = ("127.0.0.1",),
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        expired: bool = False,
        chain: bool = False,
        cn: str | None = None,
    ) -> CertFiles:
        """A server certificate (extendedKeyUsage serverAuth) for ``dns`` and ``ips``.

        ``expired``: valid only for a day that ended a day ago (``not_before``/``not_after``
        set the window exactly instead). ``chain``: the cert file holds the leaf followed by
        this CA and its issuers up to the root, as a server sends them.
        """
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        return self._issue(
            name,
            cn or name,
            sans,
            ExtendedKeyUsageOID.SERVER_AUTH,
            _validity(expired, not_before, not_after),
            chain,
        )

    def issue_client(
        self,
        name: str,
        uris: Sequence[str] = (),
        dns: Sequence[str] = (),
        *,
        cn: str | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        expired: bool = False,
        chain: bool = False,
    ) -> CertFiles:
        """A client certificate (extendedKeyUsage clientAuth) with subject CN ``cn``
        (default ``name``) and optional URI SANs (``spiffe://example.org/ns/default/sa/web``)
        and DNS SANs. ``expired`` and ``chain`` as for :meth:`issue_server`.
        """
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.DNSName(d) for d in dns]
        return self._issue(
            name,
            name if cn is None else cn,
            sans,
            ExtendedKeyUsageOID.CLIENT_AUTH,
            _validity(expired, not_before, not_after),
            chain,
        )

    def _issue(
        self,
        name: str,
        common_name: str,
        sans: Iterable[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        validity: tuple[datetime.datetime, datetime.datetime],
        chain: bool,
    ) -> CertFiles:
        if name == self.name:
            raise ValueError(f"{name!r} is the CA's own file name; pick another")
        key = _new_key()
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name) if common_name else x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        sans = list(sans)
        if sans:  # an empty subjectAltName is invalid (RFC 5280 4.2.1.6): leave it out
            # Critical when the subject is empty, as RFC 5280 4.2.1.6 requires.
            builder = builder.add_extension(
                x509.SubjectAlternativeName(sans), critical=not common_name
            )
        cert = builder.sign(self.key, hashes.SHA256())
        pem = _pem(cert)
        if chain:
            pem += b"".join(_pem(c) for c in (self.cert, *self.parents))
        files = CertFiles(self.dir / f"{name}.crt", self.dir / f"{name}.key", serial, self.root_pem)
        _write_atomically(files.cert, pem)
        _write_atomically(files.key, _key_pem(key), 0o600)
        return files
