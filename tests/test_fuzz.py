"""The descriptor/translation fuzzer runs for a bounded time on every `make test`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.native

ROOT = Path(__file__).resolve().parent.parent


def test_fuzzer_finds_nothing_in_fifteen_seconds() -> None:
    assert shutil.which("clang"), "clang is missing: `make setup` installs it"
    res = subprocess.run(
        ["bash", str(ROOT / "native/fuzz/run.sh"), "15"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    tail = res.stderr[-3000:]
    assert res.returncode == 0, f"fuzzer failed:\n{tail}"
    runs = [ln for ln in res.stderr.splitlines() if ln.startswith("stat::number_of_executed_units")]
    assert runs and int(runs[0].split(":")[-1]) > 10_000, tail  # it really ran
