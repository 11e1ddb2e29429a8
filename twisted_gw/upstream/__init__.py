"""
The upstream side: a treq client per upstream over a persistent connection
pool, stoppable body delivery, and the health checks.
"""

from twisted_gw.upstream.client import BadUpstreamResponse, BodyRelay, Upstream, discard, stream_body

__all__ = ["BadUpstreamResponse", "BodyRelay", "Upstream", "discard", "stream_body"]
