"""Latency summaries shared by every benchmark."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def latency_row(path: str, lat_ns: Sequence[int] | Any, **extra: Any) -> dict[str, Any]:
    """A result row: percentiles in microseconds and round trips per second."""
    a = np.asarray(lat_ns, dtype=np.float64)
    p50, p99, p999 = np.percentile(a, [50, 99, 99.9]) / 1000.0
    return {
        "path": path,
        "p50_us": round(float(p50), 3),
        "p99_us": round(float(p99), 3),
        "p999_us": round(float(p999), 3),
        "ops_per_s": round(float(1e9 / a.mean()), 1),
        "samples": int(a.size),
        **extra,
    }


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("inf")


def fmt(v: Any) -> str:
    """One number style for every table: 3 significant decimals below 1000, grouped above."""
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.4g}"
