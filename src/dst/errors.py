"""One error tree for all of dst.

Targets raise :class:`BlockError` carrying an ``errno``; the NBD server maps it to
the wire with one table (``dst.nbd.constants.errno_to_nbd``).  A peer that breaks
the NBD protocol raises :class:`ProtocolError`.  Configuration and control errors
name what was wrong.  Anything else escaping a layer is a bug.
"""

from __future__ import annotations

import errno as _errno
import os


class DstError(Exception):
    """Base of every error dst raises on purpose."""


class BlockError(DstError):
    """An I/O request failed; ``errno`` says how (EIO, ENOSPC, EPERM, ...)."""

    def __init__(self, err: int, message: str = "") -> None:
        self.errno = err
        self.message = message or os.strerror(err)
        super().__init__(self.message)

    def __repr__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"BlockError({name}, {self.message!r})"


class ProtocolError(DstError):
    """The NBD peer sent something the protocol does not allow."""


class ServerRefused(DstError):
    """The NBD server refused an option (no such export, TLS required, ...)."""

    def __init__(self, message: str, *, reply: int = 0) -> None:
        super().__init__(message)
        self.reply = reply


class ConfigError(DstError):
    """A spec or command-line value is wrong.  ``where`` names the file/line/key."""

    def __init__(self, message: str, *, where: str = "") -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where


class Unsupported(ConfigError):
    """The device does not do this at all (a stripe cannot grow in place), as opposed
    to a ConfigError about the arguments."""


class ControlError(DstError):
    """A control-socket request failed; ``code`` is a stable machine-readable word."""

    def __init__(self, code: str, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.field = field
