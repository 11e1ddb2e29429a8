"""
C{llmgw-tls}: a key and a self-signed certificate for serving the gateway over
HTTPS on the LAN.

    llmgw-tls --host gpu-box.lan --ip 192.0.2.10 --out /etc/llmgw
    twistd -n llmgw --listen ssl:8443:privateKey=/etc/llmgw/key.pem:certKey=/etc/llmgw/cert.pem

Clients trust it by pointing at cert.pem (curl --cacert, SSL_CERT_FILE, or an
httpx/OpenAI client built with that file).  Made with C{cryptography}, which
pyOpenSSL already brings.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def self_signed(hosts: Sequence[str], ips: Sequence[str], days: int) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a self-signed certificate for C{hosts} and C{ips}: (key PEM, cert PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (list(hosts) + list(ips))[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


def _ip(text: str) -> str:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="llmgw-tls", description="Write key.pem and a self-signed cert.pem.")
    parser.add_argument("--host", action="append", default=[], help="DNS name to certify (repeatable)")
    parser.add_argument("--ip", action="append", default=[], type=_ip, help="IP address to certify (repeatable)")
    parser.add_argument("--out", default=".", help="directory for key.pem and cert.pem (default: .)")
    parser.add_argument("--days", type=int, default=825, help="validity in days (default: 825)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    if not args.host and not args.ip:
        parser.error("give at least one --host or --ip")
    key_path, cert_path = os.path.join(args.out, "key.pem"), os.path.join(args.out, "cert.pem")
    if not args.force and (os.path.exists(key_path) or os.path.exists(cert_path)):
        print(f"llmgw-tls: {key_path} or {cert_path} exists; --force to overwrite", file=sys.stderr)
        return 1
    key_pem, cert_pem = self_signed(args.host, args.ip, args.days)
    os.makedirs(args.out, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    with open(cert_path, "wb") as f:
        f.write(cert_pem)
    print(f"wrote {key_path} (mode 600) and {cert_path} for {', '.join(args.host + args.ip)}")
    print(f"serve: --listen ssl:8443:privateKey={key_path}:certKey={cert_path}")
    print(f"trust: curl --cacert {cert_path} https://{(args.host + args.ip)[0]}:8443/health")
    return 0


if __name__ == "__main__":
    sys.exit(main())
