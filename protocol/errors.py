"""The one error tree of the wire protocols."""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every protocol error. ``str(err)`` names what was wrong."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that violate the protocol (bad header, bad length, bad JSON...)."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol cannot carry (too long, unknown name...)."""
