"""Shared helpers of the benchmark scripts: synchronized timing, device facts, JSON + table output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from datetime import date

import jax


def time_fn(fn, *args, warmup: int = 2, reps: int = 5) -> dict:
    """Median / min / max wall time in seconds of ``fn(*args)`` after ``warmup`` calls; every call is
    synchronized with ``block_until_ready`` so asynchronous dispatch cannot hide device time."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": reps}


def device_info() -> dict:
    d = jax.devices()[0]
    return {"platform": d.platform, "device": getattr(d, "device_kind", str(d)), "jax": jax.__version__,
            "python": platform.python_version(), "date": date.today().isoformat()}


def peak_memory_gb() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 1e9


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """rows of dicts; columns of (key, header)."""
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for j, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def write_json(path: str | None, payload: dict, quiet: bool = False) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        if not quiet:
            print(f"wrote {path}")
