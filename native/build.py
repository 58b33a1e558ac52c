"""cffi out-of-line API builder for the native data plane.

The public headers in native/include are the cdef: preprocessor lines other than
integer #defines are dropped and the rest is handed to cffi as is. The build stamp
is a hash of the native sources, compiled into the module and compared at import by
iopart._native, so a stale build is caught instead of misbehaving.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
PUBLIC_HEADERS = ("iop_channel.h", "iop_xlate.h", "iop_worker.h", "iop_dtab.h", "iop_blk.h", "iop_guestmem.h", "iop_vswitch.h", "iop_nic.h", "iop_journal.h")
SOURCES = ("channel.c", "xlate.c", "worker.c", "dtab.c", "blk.c", "guestmem.c", "vswitch.c", "nic.c", "journal.c")
_DEFINE = re.compile(r"^#define\s+\w+\s+-?(0x[0-9a-fA-F]+|\d+)\s*$")


def source_stamp() -> str:
    spec = importlib.util.spec_from_file_location("iop_stamp", HERE / "stamp.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return str(mod.source_stamp(HERE))


def cdef_text() -> str:
    out = []
    for name in PUBLIC_HEADERS:
        for line in (HERE / "include" / name).read_text().splitlines():
            if line.startswith("#") and not _DEFINE.match(line):
                continue
            out.append(line)
    return "\n".join(out)


ffibuilder = FFI()
ffibuilder.cdef(cdef_text())
ffibuilder.set_source(
    "iopart._iop_native",
    "\n".join(f'#include "{h}"' for h in PUBLIC_HEADERS),
    sources=[str(Path("native") / s) for s in SOURCES],
    include_dirs=[str(Path("native") / "include")],
    define_macros=[("IOP_BUILD_STAMP", f'"{source_stamp()}"'), ("_GNU_SOURCE", "1")],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["pthread", "uring"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
