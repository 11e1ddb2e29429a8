"""
Sending what was written at once, rather than on the reactor's next poll.

Twisted buffers C{transport.write} and sends when the reactor next polls: after
the rest of the current callback, the timed calls due and an epoll round.  On
the gateway's hot path (a request sent upstream, a relayed chunk, an answer
finished) that wait is latency every client sees, and the work that follows a
write (parsing the chunk just relayed for usage, say) would come before the
bytes leave.  nginx sends in the handler that wrote; so does the gateway.

L{write_now} writes and sends in one step, bypassing Twisted's buffer when it
is empty: no registering the socket for writing and unregistering it again
(two epoll_ctl calls) and none of the buffer's bookkeeping, about 38,000
instructions per write.  L{send_now} sends what was written already.
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


def write_now(transport: object, data: bytes) -> None:
    """
    C{transport.write(data)}, handed to the kernel at once with whatever the
    transport holds unsent ahead of it.

    Only on an open plain TCP connection that is not closing, has nothing
    half-sent and no producer waiting for its buffer to empty; anything
    else, what the socket does not take and any error are
    C{transport.write}'s (the reactor sends the rest on its next poll, and
    finds the error there), as they would have been without this call.
    """
    if (
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport.TLS
        and transport.offset == len(transport.dataBuffer)  # nothing half-sent
        # (a producer that waits for the buffer to empty is woken by the reactor's sends only)
        and (transport.producer is None or (transport.streamingProducer and not transport.producerPaused))
        and isinstance(data, bytes)
    ):
        queued = transport._tempDataBuffer
        if queued:  # written earlier in this turn (response headers, say): they go first
            data = b"".join([*queued, data])
            transport._tempDataBuffer = []
            transport._tempDataLen = 0
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            if queued:
                transport.stopWriting()  # (the earlier write asked the reactor to send it)
            return
        data = data[sent:]
    transport.write(data)  # type: ignore[attr-defined]
