"""
Who runs when: the upstreams' places (routing), the fair queue in front of
them, per-user limits and token quotas, and the keepalive timer of waiting
streams.  Pure logic: time comes from an injected clock.
"""

from twisted_gw.admission.availability import Availability
from twisted_gw.admission.queue import Admission, NoUpstream, QueueFull, QueueTimeout, ShuttingDown, Ticket
from twisted_gw.admission.routing import DOWN, LOADING, OK, UNKNOWN, Route, Router
from twisted_gw.admission.settings import UserSettings

__all__ = [
    "DOWN", "LOADING", "OK", "UNKNOWN", "Admission", "Availability", "NoUpstream", "QueueFull", "QueueTimeout",
    "Route", "Router", "ShuttingDown", "Ticket", "UserSettings",
]
