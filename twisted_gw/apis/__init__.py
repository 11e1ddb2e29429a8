"""
The shapes of the APIs the gateway serves, without I/O: request checks, error
bodies, server-sent events, usage, model lists and assembled answers.
"""
