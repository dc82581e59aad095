"""A throwaway PKI for tests: a CA, certificates it signs (valid, expired), and a second, unrelated CA.

Every certificate is for localhost and 127.0.0.1 and can serve as both server and client certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Authority:
    def __init__(self, directory, name: str = "kvtier-test-ca"):
        self.directory = str(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_path = self._write(f"{name}.pem", self.cert.public_bytes(serialization.Encoding.PEM))

    def _write(self, filename: str, data: bytes, private: bool = False) -> str:
        """Writes a file; a private one (a key) is mode 0600, as the daemon requires of its secrets."""
        path = os.path.join(self.directory, filename)
        with open(path, "wb") as file:
            file.write(data)
        if private:
            os.chmod(path, 0o600)
        return path

    def issue(self, common_name: str, expired: bool = False) -> tuple[str, str]:
        """(cert path, key path) for localhost/127.0.0.1, signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = ((now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)) if expired
                      else (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=7)))
        cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self.key, hashes.SHA256()))
        stem = f"{self.name}-{common_name}{'-expired' if expired else ''}"
        return (self._write(f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM)),
                self._write(f"{stem}.key", _pem_key(key), private=True))


def peer_overrides(authority: Authority, ports: list[int], index: int, transport: str) -> dict:
    """Daemon config for node `index` of a loopback cluster on `ports`, peering with all the others."""
    cert, key = authority.issue(f"node{index}")
    return {"peers.listen": f"127.0.0.1:{ports[index]}", "peers.node_id": f"node{index}",
            "peers.addresses": [f"127.0.0.1:{p}" for j, p in enumerate(ports) if j != index],
            "peers.tls_cert": cert, "peers.tls_key": key, "peers.tls_ca": authority.ca_path,
            "peers.transport": transport}
