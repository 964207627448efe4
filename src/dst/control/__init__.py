"""The control socket: typed requests (messages), the daemon's server, the CLI's client."""

from dst.control.client import ControlClient, call
from dst.control.messages import Request, Response
from dst.control.server import ControlServer

__all__ = ["ControlClient", "ControlServer", "Request", "Response", "call"]
