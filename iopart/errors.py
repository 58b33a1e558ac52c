"""The one exception tree of iopart: every error carries errno and a stable kind."""

from __future__ import annotations

import errno as _errno
import os


class IopartError(Exception):
    """Base of every iopart error. `kind` is stable for scripts; `errno` is 0 or an errno."""

    kind = "error"

    def __init__(self, message: str, *, errno: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "errno": self.errno,
            "errno_name": _errno.errorcode.get(self.errno, ""),
            "message": self.message,
        }


class ConfigError(IopartError):
    kind = "config"


class NativeError(IopartError):
    """A native call failed; errno is the negated return code."""

    kind = "native"

    @classmethod
    def from_rc(cls, rc: int, what: str, why: str = "") -> NativeError:
        err = -rc
        detail = why or os.strerror(err)
        return cls(f"{what}: {detail} ({_errno.errorcode.get(err, err)})", errno=err)


class StaleBuildError(IopartError):
    kind = "stale-build"


class PoolError(IopartError):
    kind = "pool"


class ChannelError(IopartError):
    kind = "channel"


class BadHeaderError(ChannelError):
    kind = "bad-header"


class ChannelBrokenError(ChannelError):
    kind = "channel-broken"


class HandoffError(ChannelError):
    kind = "handoff"
