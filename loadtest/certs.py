"""Throwaway certificates for the TLS scenarios, made into a run's temporary directory.

One CA signs two server certificates, both for ``localhost`` and ``127.0.0.1``: the listener's
(our proxy's ``--tls-cert`` and HAProxy's ``bind ... ssl crt``, the same key in both) and the
backends' (every TLS goecho; HAProxy and our proxy verify it against the CA). Every key is EC
P-256 and every signature ECDSA with SHA-256, so the handshake costs the same wherever the
certificate is used.

They are made with the ``cryptography`` package when it is importable (a dev dependency), else
with the ``openssl`` command. Either way the extensions are the ones strict verifiers insist on
(Go's crypto/x509, OpenSSL with X509_V_FLAG_X509_STRICT): a critical basicConstraints, keyUsage,
the key identifiers, extendedKeyUsage serverAuth on the leaves and SANs (hostname checks ignore
the CN).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

from loadtest import tools

SERVER_NAME = "localhost"  # the name both proxies check the backends' certificate against
IP_SAN = "127.0.0.1"
LIFETIME_DAYS = 2
CLOCK_SKEW = dt.timedelta(hours=1)  # valid from an hour back: a clock a little behind is fine


@dataclass(frozen=True)
class BenchCerts:
    """The PEM files of one run. ``listener_pem`` is the listener's certificate followed by its
    key, the one-file form HAProxy's ``crt`` reads."""

    ca: Path
    listener_cert: Path
    listener_key: Path
    listener_pem: Path
    backend_cert: Path
    backend_key: Path
    made_with: str  # "cryptography" or "openssl"

    def describe(self) -> str:
        return (
            f"a CA and two server certificates for {SERVER_NAME}/{IP_SAN} (listeners; "
            f"backends), EC P-256 keys, ECDSA-SHA256, made with {self.made_with}"
        )


def make(directory: Path, use_cryptography: bool | None = None) -> BenchCerts:
    """Write the CA, the listener's and the backends' certificates and keys into ``directory``.

    ``use_cryptography`` None: the ``cryptography`` package when importable, else ``openssl``.
    Raises RuntimeError when neither can make them.
    """
    directory.mkdir(parents=True, exist_ok=True)
    if use_cryptography is None:
        use_cryptography = importlib.util.find_spec("cryptography") is not None
    if use_cryptography:
        _with_cryptography(directory)
    else:
        _with_openssl(directory)
    listener_pem = directory / "listener.pem"
    listener_pem.write_bytes(
        (directory / "listener.crt").read_bytes() + (directory / "listener.key").read_bytes()
    )
    return BenchCerts(
        ca=directory / "ca.crt",
        listener_cert=directory / "listener.crt",
        listener_key=directory / "listener.key",
        listener_pem=listener_pem,
        backend_cert=directory / "backend.crt",
        backend_key=directory / "backend.key",
        made_with="cryptography" if use_cryptography else "openssl",
    )


# --- with the cryptography package ----------------------------------------------------------


def _with_cryptography(directory: Path) -> None:
    # Imported here: cryptography is a dev dependency, and the openssl path does without it.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def key_usage(*, cert_sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=cert_sign,
            crl_sign=cert_sign,
            encipher_only=False,
            decipher_only=False,
        )

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path = directory / f"{stem}.key"
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("loadtest CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=LIFETIME_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca_cert, ca_key)
    sans = x509.SubjectAlternativeName(
        [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address(IP_SAN))]
    )
    for stem in ("listener", "backend"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(f"loadtest {stem}"))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=LIFETIME_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(sans, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
            .sign(ca_key, hashes.SHA256())
        )
        write(stem, cert, key)


# --- with the openssl command ---------------------------------------------------------------

# -nodes: no passphrase on the key (deprecated for -noenc in OpenSSL 3, which 1.1 lacks).
_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
_CA_EXTENSIONS = """\
basicConstraints = critical, CA:true, pathlen:0
keyUsage = critical, digitalSignature, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""
_LEAF_EXTENSIONS = f"""\
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:{SERVER_NAME}, IP:{IP_SAN}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _openssl(openssl: str, directory: Path, *args: str) -> None:
    done = subprocess.run(
        [openssl, *args], cwd=directory, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()[-300:]}")


def _with_openssl(directory: Path) -> None:
    openssl = tools.find("openssl")
    if openssl is None:
        raise RuntimeError("no certificates: neither the cryptography package nor openssl")
    (directory / "ca.ext").write_text(_CA_EXTENSIONS)
    (directory / "leaf.ext").write_text(_LEAF_EXTENSIONS)
    days = ["-days", str(LIFETIME_DAYS)]
    # A request signed by its own key, then by itself (`-signkey`), rather than `req -x509`,
    # which would add the extensions of openssl.cnf, and those differ between distributions.
    ca_request = ["req", "-new", *_EC_KEY, "-keyout", "ca.key", "-subj", "/CN=loadtest CA"]
    _openssl(openssl, directory, *ca_request, "-out", "ca.csr")
    ca_sign = ["x509", "-req", "-in", "ca.csr", "-signkey", "ca.key", *days]
    _openssl(openssl, directory, *ca_sign, "-extfile", "ca.ext", "-out", "ca.crt")
    for stem in ("listener", "backend"):
        request = ["req", "-new", *_EC_KEY, "-keyout", f"{stem}.key", "-out", f"{stem}.csr"]
        _openssl(openssl, directory, *request, "-subj", f"/CN=loadtest {stem}")
        sign = ["x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.crt", "-CAkey", "ca.key"]
        # -CAcreateserial: a random serial kept in ca.srl, so the two leaves never share one.
        sign += ["-CAcreateserial", *days, "-extfile", "leaf.ext", "-out", f"{stem}.crt"]
        _openssl(openssl, directory, *sign)
        (directory / f"{stem}.key").chmod(0o600)
