"""
Sending what was written at once, rather than on the reactor's next poll.

Twisted buffers C{transport.write} and sends when the reactor next polls: after
the rest of the current callback, the timed calls due and an epoll round.  On
the gateway's hot path (a request sent upstream, a relayed chunk, an answer
finished) that wait is latency every client sees, and the work that follows a
write (parsing the chunk just relayed for usage, say) would come before the
bytes leave.  nginx sends in the handler that wrote; so does the gateway.
"""

from __future__ import annotations

from twisted.internet import tcp


def send_now(transport: object) -> None:
    """
    Hand the bytes C{transport} holds to the kernel now.

    Only a plain TCP connection that is open and not closing is written this
    way (a TLS transport, or a test's fake one, waits for the reactor as
    usual).  What the socket does not take, and any error, stays with the
    transport: the reactor still watches it for writing and takes both up on
    its next poll, as it would have without this call.
    """
    if (
        isinstance(transport, tcp.Connection)
        and transport._tempDataLen  # written since the last send
        and transport.connected
        and not transport.disconnecting
    ):
        transport.doWrite()
