"""Binding to the native data plane: loads the cffi module and checks its stamp.

Everything else imports `ffi` and `lib` from here, never from the extension
directly, so a missing or stale build is reported once, clearly.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from iopart.errors import IopartError, NativeError, StaleBuildError

NATIVE_ABI = 2
_REBUILD = "rebuild it with `make setup` (or `.venv/bin/pip install -e .`)"

try:
    from iopart._iop_native import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the install
    raise IopartError(
        f"the native module iopart._iop_native is not built: {exc}; {_REBUILD}"
    ) from exc


def build_stamp() -> str:
    return str(ffi.string(lib.iop_build_stamp()).decode())


def _source_stamp() -> str | None:
    """Stamp of the native sources next to this package, if this is a source tree."""
    native = Path(__file__).resolve().parent.parent / "native"
    stamp_py = native / "stamp.py"
    if not stamp_py.is_file():
        return None
    spec = importlib.util.spec_from_file_location("iop_stamp", stamp_py)
    if spec is None or spec.loader is None:
        return None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return str(mod.source_stamp(native))


def _check_build() -> None:
    abi = int(lib.iop_abi_version())
    if abi != NATIVE_ABI:
        raise StaleBuildError(
            f"native module ABI {abi} does not match the Python package's {NATIVE_ABI}; {_REBUILD}"
        )
    want = _source_stamp()
    if want is not None and want != build_stamp():
        raise StaleBuildError(
            f"native module is stale (built from {build_stamp()}, sources are {want}); {_REBUILD}"
        )


def check(rc: int, what: str, why: Any = None) -> int:
    """Turn a negative errno return into NativeError; pass counts through."""
    if rc < 0:
        detail = ""
        if why is not None and why[0] != ffi.NULL:
            detail = ffi.string(why[0]).decode()
        raise NativeError.from_rc(rc, what, detail)
    return rc


_check_build()

__all__ = ["NATIVE_ABI", "build_stamp", "check", "ffi", "lib"]
