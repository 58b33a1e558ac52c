"""Comparison points built from source here (never downloaded): small C programs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"


def build(name: str) -> Path:
    """Compile bench/peers/NAME.c once (rebuilt when the source is newer)."""
    src = HERE / f"{name}.c"
    out = BUILD / name
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found: `make setup` installs gcc")
    BUILD.mkdir(exist_ok=True)
    subprocess.run([cc, "-O2", "-Wall", "-o", str(out), str(src)], check=True)
    return out


def run_raw_ring(mode: str, n: int, cpu_client: int, cpu_server: int, arg: str) -> dict[str, Any]:
    """Run one mode of raw_ring; returns its JSON line."""
    exe = build("raw_ring")
    res = subprocess.run(
        [str(exe), mode, str(n), str(cpu_client), str(cpu_server), arg],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out
