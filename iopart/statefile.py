"""State files other processes read (`boot.json`, `iop-a.json`): written whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any, *, durable: bool = True) -> None:
    """Write, (fsync,) rename: a reader sees the old file or the new one, never half.
    durable=False skips the fsync, for reports that are rewritten every second anyway."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
