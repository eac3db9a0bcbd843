"""Credentials for Flower's transport security, made with `cryptography` (no openssl or ssh-keygen needed):

- a certificate authority (``ca.crt``, ``ca.key``) and a SuperLink certificate it signs (``server.pem``,
  ``server.key``) for the hosts the sites connect to: ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile
  server.pem --ssl-keyfile server.key``; each site and the ``flwr`` CLI trust ``ca.crt``;
- one ECDSA P-384 key pair per site in OpenSSH format (``<site>``, ``<site>.pub``), what Flower's SuperNode
  authentication takes: the operator registers ``<site>.pub`` (``flwr supernode register``), the site starts with
  ``flower-supernode --auth-supernode-private-key <site>``.

Private keys are written readable by their owner only. Copy each site's private key to that site alone.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fusion.errors import GramfuseError

VALID_DAYS = 365
TLS_FILES = ("ca.crt", "ca.key", "server.pem", "server.key")


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """Keys are not replaced unless asked: a CA made again invalidates every certificate it signed, and a site key
    made again must be registered again."""
    existing = [str(path) for path in paths if path.exists()]
    if existing and not overwrite:
        raise GramfuseError(f"{', '.join(existing)}: already exist(s); give --overwrite to replace (the old "
                            "certificates or registrations stop working)")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gramfuse federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _subject_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_tls(out_dir: Path, hosts: list[str], overwrite: bool = False) -> list[Path]:
    """A CA and a SuperLink certificate for ``hosts`` (names or IP addresses)."""
    if not hosts:
        raise GramfuseError("the SuperLink certificate needs at least one host name or address (--host)")
    _refuse_existing([out_dir / name for name in TLS_FILES], overwrite)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("gramfuse CA")).issuer_name(_name("gramfuse CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"ca.crt": (ca_cert.public_bytes(serialization.Encoding.PEM), False),
             "ca.key": (_pem_key(ca_key), True),
             "server.pem": (server_cert.public_bytes(serialization.Encoding.PEM), False),
             "server.key": (_pem_key(server_key), True)}
    for name, (data, private) in files.items():
        _write(out_dir / name, data, private)
    return [out_dir / name for name in files]


def make_site_key(out_dir: Path, site: str, overwrite: bool = False) -> tuple[Path, Path]:
    """An OpenSSH ECDSA P-384 key pair for SuperNode authentication: ``(private, public)``."""
    if not site or "/" in site or site.startswith("."):
        raise GramfuseError(f"site name {site!r} cannot name a key file")
    if site in TLS_FILES or site.endswith(".pub"):
        raise GramfuseError(f"site name {site!r} collides with the CA's, the SuperLink's or another site's key "
                            f"files ({', '.join(TLS_FILES)}, <site>.pub); choose another name")
    private, public = out_dir / site, out_dir / f"{site}.pub"
    _refuse_existing([private, public], overwrite)
    key = ec.generate_private_key(ec.SECP384R1())
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption()), private=True)
    _write(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
           + f" {site}\n".encode())
    return private, public
