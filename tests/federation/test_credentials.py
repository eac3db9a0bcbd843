"""`gramfuse credentials`: certificates Flower's SuperLink serves and site keys Flower's authentication accepts."""

import ipaddress
import stat

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

from fusion.cli import main


def test_certificates_chain_to_the_ca_and_cover_every_host(tmp_path, capsys):
    assert main(["credentials", str(tmp_path), "--host", "127.0.0.1", "--host", "superlink.example.org"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key((tmp_path / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for private in ("ca.key", "server.key"):
        assert stat.S_IMODE((tmp_path / private).stat().st_mode) == 0o600


def test_site_keys_are_what_flower_authentication_loads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` reads

    assert main(["credentials", str(tmp_path), "--site", "site-a"]) == 0
    private = load_ssh_private_key((tmp_path / "site-a").read_bytes(), None)  # as flower-supernode loads it
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert stat.S_IMODE((tmp_path / "site-a").stat().st_mode) == 0o600
    assert try_load_public_key(tmp_path / "site-a.pub")
    assert not (tmp_path / "ca.crt").exists()  # only what was asked for


def test_credentials_errors(tmp_path, capsys):
    assert main(["credentials", str(tmp_path)]) == 1
    assert "gramfuse: error: nothing to make" in capsys.readouterr().err
    assert main(["credentials", str(tmp_path), "--site", "../elsewhere"]) == 1
    assert "cannot name a key file" in capsys.readouterr().err


def test_keys_are_never_replaced_without_overwrite_and_site_names_cannot_take_the_cas(tmp_path, capsys):
    assert main(["credentials", str(tmp_path), "--host", "localhost", "--site", "site-a"]) == 0
    kept = {name: (tmp_path / name).read_bytes() for name in ("ca.key", "ca.crt", "site-a", "site-a.pub")}
    assert main(["credentials", str(tmp_path), "--host", "localhost"]) == 1
    assert "ca.key" in capsys.readouterr().err
    assert main(["credentials", str(tmp_path), "--site", "site-a"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    for name in ("ca.key", "server.key", "ca.crt", "x.pub"):  # a site named ca.key would replace the CA's key
        assert main(["credentials", str(tmp_path), "--site", name, "--overwrite"]) == 1
        assert "collides" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept
    assert main(["credentials", str(tmp_path), "--site", "site-a", "--overwrite"]) == 0
    assert (tmp_path / "site-a").read_bytes() != kept["site-a"]
    assert (tmp_path / "ca.key").read_bytes() == kept["ca.key"]
