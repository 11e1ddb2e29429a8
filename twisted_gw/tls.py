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

from OpenSSL import SSL
from twisted.internet import endpoints
from twisted.internet.interfaces import IOpenSSLContextFactory, IStreamServerEndpoint
from twisted.internet.ssl import Certificate, CertificateOptions, KeyPair, TLSVersion
from twisted.logger import Logger
from zope.interface import implementer

log = Logger(namespace="llmgw.tls")

_RELOADABLE = {"privateKey", "certKey", "interface", "backlog", "extraCertChain"}


def certificates_from_pem(pem: bytes) -> list[Certificate]:
    """Every certificate of a PEM bundle, in order."""
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
        with open(self.certificate, "rb") as f:
            cert_pem = f.read()
        with open(self.private_key, "rb") as f:
            key_pem = f.read()
        chain: list[Any] = []
        if self.chain:
            with open(self.chain, "rb") as f:
                chain = [c.original for c in certificates_from_pem(f.read())]
        options = CertificateOptions(
            privateKey=KeyPair.load(key_pem, format=1).original,  # 1 = FILETYPE_PEM
            certificate=Certificate.loadPEM(cert_pem).original,
            extraCertChain=chain,
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )
        return options.getContext()

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


def _split(description: str) -> list[str]:
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
    parts = _split(description)
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
