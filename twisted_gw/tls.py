"""
Native TLS listeners whose certificate can be reloaded (on SIGHUP) without
dropping open connections or refusing new ones.

A C{--listen ssl:PORT:privateKey=KEY:certKey=CERT[:interface=..][:backlog=..]
[:extraCertChain=..]} description gets an endpoint whose context factory hands
each new connection the current certificate; connections already open keep the
one they were made with.  TLS 1.2 is the minimum.
"""

from __future__ import annotations

from typing import Any, Optional

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL
from twisted.internet import endpoints
from twisted.internet.interfaces import IOpenSSLContextFactory, IStreamServerEndpoint
from twisted.internet.ssl import Certificate, CertificateOptions, TLSVersion
from twisted.logger import Logger
from zope.interface import implementer

log = Logger(namespace="llmgw.tls")

# the private keys pyOpenSSL's Context takes
SERVER_KEYS = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey,
               dsa.DSAPrivateKey)
_RELOADABLE = {"privateKey", "certKey", "interface", "backlog", "extraCertChain"}


def certificates_from_pem(pem: bytes) -> list[Certificate]:
    """Every certificate of a PEM bundle, in order, as Twisted's (for a client's trust root)."""
    marker = b"-----BEGIN CERTIFICATE-----"
    return [Certificate.loadPEM(marker + block) for block in pem.split(marker)[1:]]


@implementer(IOpenSSLContextFactory)
class ReloadingContextFactory:
    """The current certificate and key, read again by L{reload}."""

    def __init__(self, private_key: str, certificate: str, chain: Optional[str] = None) -> None:
        self.private_key = private_key
        self.certificate = certificate
        self.chain = chain
        self._context = self._load()

    def _load(self) -> SSL.Context:
        # cryptography's objects, which pyOpenSSL takes as they are (its own X509 and PKey are deprecated);
        # a certKey file holding the whole chain serves the certificates after the first as the chain
        with open(self.certificate, "rb") as f:
            certificates = x509.load_pem_x509_certificates(f.read())
        with open(self.private_key, "rb") as f:
            key = load_pem_private_key(f.read(), password=None)
        if not isinstance(key, SERVER_KEYS):
            raise ValueError(f"{self.private_key}: a {type(key).__name__} cannot sign for TLS (RSA, ECDSA, Ed25519)")
        chain = certificates[1:]
        if self.chain:
            with open(self.chain, "rb") as f:
                chain += x509.load_pem_x509_certificates(f.read())
        # Twisted's defaults (ciphers, options, TLS 1.2 at least) on a context of our own, given
        # the certificate and key through pyOpenSSL's Context methods, which take cryptography's objects
        context = CertificateOptions(raiseMinimumTo=TLSVersion.TLSv1_2).getContext()
        context.use_certificate(certificates[0])
        for certificate in chain:
            context.add_extra_chain_cert(certificate)
        context.use_privatekey(key)
        context.check_privatekey()
        return context

    def reload(self) -> None:
        """Read the files again; on error keep serving the certificate in use."""
        try:
            self._context = self._load()
        except Exception as e:
            log.error("TLS certificate reload from {certificate} failed, keeping the current one: {error}",
                      certificate=self.certificate, error=e)
            return
        log.info("TLS certificate reloaded from {certificate}", certificate=self.certificate)

    def getContext(self) -> SSL.Context:
        return self._context


def split_description(description: str) -> list[str]:
    """Split a strports description on unescaped colons (C{\\:} is a literal colon)."""
    parts, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


DEFAULT_BACKLOG = 1024


def server_endpoint(reactor: Any, description: str) -> tuple[IStreamServerEndpoint, Optional[ReloadingContextFactory]]:
    """
    The endpoint for a C{--listen} description, and for C{ssl:} ones the
    context factory to reload; anything else is Twisted's own parser's.
    """
    parts = split_description(description)
    if parts[0] in ("tcp", "ssl") and len(parts) >= 2 and not any(p.startswith("backlog=") for p in parts[2:]):
        # Twisted's default of 50 pending connections makes the kernel send
        # SYN cookies when a few hundred clients connect at once (nginx: 511)
        description += f":backlog={DEFAULT_BACKLOG}"
        parts.append(f"backlog={DEFAULT_BACKLOG}")
    if parts[0] != "ssl" or len(parts) < 2:
        return endpoints.serverFromString(reactor, description), None
    port, options = parts[1], dict(p.split("=", 1) for p in parts[2:] if "=" in p)
    positional = [p for p in parts[2:] if "=" not in p]
    if positional or not set(options) <= _RELOADABLE or "=" in port:
        # a description the reloader does not know: Twisted's endpoint, without reload
        log.warn("--listen {description}: certificate reload is not available for it", description=description)
        return endpoints.serverFromString(reactor, description), None
    key = options.get("privateKey", "server.pem")
    factory = ReloadingContextFactory(key, options.get("certKey", key), options.get("extraCertChain"))
    endpoint = endpoints.SSL4ServerEndpoint(
        reactor, int(port), factory, backlog=int(options.get("backlog", 50)), interface=options.get("interface", ""),
    )
    return endpoint, factory
