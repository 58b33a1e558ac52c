"""Build stamp of the native sources: shared by the builder and the import check."""

from __future__ import annotations

import hashlib
from pathlib import Path


def source_stamp(root: Path) -> str:
    """Hash of every file that goes into the native module."""
    h = hashlib.sha256()
    files = sorted(root.glob("*.c")) + sorted((root / "include").glob("*.h"))
    files += [root / "build.py", root / "stamp.py"]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]
