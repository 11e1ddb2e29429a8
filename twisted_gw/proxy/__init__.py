"""
The proxy: one request's life from its checks to its books.  It writes to
its client through L{IClientResponse}, which the web layer implements; it
never imports the web layer.
"""

from twisted_gw.proxy.client import ClientRequest, IClientResponse
from twisted_gw.proxy.core import Proxy

__all__ = ["ClientRequest", "IClientResponse", "Proxy"]
