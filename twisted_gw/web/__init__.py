"""
The web layer: Klein routes, key lookup, errors in the client's dialect, the
dashboard, and twisted.web's site, channel and request through their public
hooks.  It hands C{/v1} requests to the proxy through L{WebResponse}.
"""

from twisted_gw.web.app import GatewayApp
from twisted_gw.web.site import GatewaySite

__all__ = ["GatewayApp", "GatewaySite"]
