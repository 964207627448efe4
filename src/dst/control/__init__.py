"""The control socket: typed requests (operations) on a wire (messages), the daemon's
server, the CLI's client."""

from dst.control.client import ControlClient, call
from dst.control.messages import Response
from dst.control.operations import Request
from dst.control.server import ControlServer

__all__ = ["ControlClient", "ControlServer", "Request", "Response", "call"]
