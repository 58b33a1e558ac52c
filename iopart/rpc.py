"""The resource service protocol: JSON-RPC 2.0, one object per line, on a UNIX socket.

The method table and every method's params come from one schema file,
`iopart/schema/resource_service.json`; the command partition validates against
it and the CLI is built from it.
"""

from __future__ import annotations

import errno
import json
import socket
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from iopart.errors import IopartError

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
REFUSED = -32000  # the ultravisor refused the transaction; data names the field
UNAVAILABLE = -32001  # the ultravisor cannot be reached right now
POLICY = -32002  # the command partition's policy refuses it; data names the field
MAX_LINE = 1 << 20


class RpcError(IopartError):
    """A JSON-RPC error reply (or a transport failure, code UNAVAILABLE)."""

    kind = "rpc"

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        err = int(data.get("errno", 0)) if isinstance(data, dict) else 0
        super().__init__(message, errno=err)
        self.code = code
        self.data = data

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "code": self.code, "data": self.data}


@cache
def schema() -> dict[str, Any]:
    text = resources.files("iopart").joinpath("schema/resource_service.json").read_text()
    doc: dict[str, Any] = json.loads(text)
    return doc


@cache
def _validator(method: str) -> Draft202012Validator:
    doc = schema()
    sub = {"$defs": doc["$defs"], **doc["methods"][method]["params"]}
    return Draft202012Validator(sub)


def methods() -> dict[str, str]:
    """Method name -> one-line summary."""
    return {m: d["summary"] for m, d in schema()["methods"].items()}


def check_params(method: str, params: Any) -> dict[str, Any]:
    """Validate params of a known method; RpcError(INVALID_PARAMS) naming the field."""
    if method not in schema()["methods"]:
        raise RpcError(METHOD_NOT_FOUND, f"no method {method!r}; known: {', '.join(methods())}")
    if params is None:
        params = {}
    errors = sorted(_validator(method).iter_errors(params), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.path) or _missing_field(e.message) or "params"
        raise RpcError(
            INVALID_PARAMS,
            f"{method}: {where}: {e.message}",
            {"field": where, "errno": errno.EINVAL},
        )
    assert isinstance(params, dict)
    return params


def _missing_field(message: str) -> str:
    # jsonschema: "'name' is a required property" / "Additional properties ... ('x' was ...)"
    parts = message.split("'")
    return parts[1] if len(parts) >= 3 else ""


class RpcClient:
    """A blocking client of command.sock."""

    def __init__(self, state_dir: Path, timeout: float = 30.0) -> None:
        self.path = state_dir / "command.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except OSError as exc:
            self.sock.close()
            raise RpcError(
                UNAVAILABLE,
                f"the command partition is not answering at {self.path}: {exc.strerror} "
                "(is the stack up? `iopart up`)",
                {"errno": exc.errno or errno.ECONNREFUSED},
            ) from None
        self.file = self.sock.makefile("rb")
        self.next_id = 1

    def call(self, method: str, **params: Any) -> Any:
        rid = self.next_id
        self.next_id += 1
        req = {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}
        try:
            self.sock.sendall(json.dumps(req).encode() + b"\n")
            line = self.file.readline(MAX_LINE)
        except OSError as exc:
            raise RpcError(UNAVAILABLE, f"command partition connection lost: {exc}",
                           {"errno": exc.errno or errno.EPIPE}) from None
        if not line:
            raise RpcError(UNAVAILABLE, "command partition closed the connection",
                           {"errno": errno.ECONNRESET})
        reply = json.loads(line)
        if "error" in reply:
            e = reply["error"]
            raise RpcError(int(e.get("code", INTERNAL_ERROR)), str(e.get("message")),
                           e.get("data"))
        return reply["result"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
