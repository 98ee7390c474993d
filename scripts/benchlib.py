"""Shared helpers of the benchmark scripts: synchronized timing, device facts, JSON + table output."""

from __future__ import annotations

import glob
import gzip
import json
import os
import platform
import re
import statistics
import tempfile
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


# --------------------------------------------------------------------------------------------------
# Device traces: kernel time as the GPU saw it, free of dispatch and synchronization overhead
# --------------------------------------------------------------------------------------------------


def device_events(trace_dir: str) -> tuple[list[dict], str]:
    """Complete ('X') events of the accelerator's streams in the Perfetto trace ``jax.profiler`` wrote
    under ``trace_dir``, and a note naming the process/threads they came from (no events on a CPU)."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(sorted(paths)[-1]) as f:
        events = json.load(f)["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpu = [pid for pid, name in procs.items() if re.search(r"GPU|device:", name) and "host" not in name.lower()]
    if not gpu:
        return [], f"no device process in the trace (processes: {sorted(procs.values())})"
    pid = gpu[0]
    streams = {key for key, name in threads.items() if key[0] == pid and re.search(r"stream", name, re.I)}
    xs = [e for e in events if e.get("ph") == "X" and e.get("pid") == pid
          and (not streams or (e["pid"], e["tid"]) in streams)]
    return xs, f"{procs[pid]}: threads {sorted(threads[k] for k in streams) or 'all'}"


def trace_events(run, trace_dir: str | None = None) -> tuple[list[dict], str]:
    """Runs ``run()`` (which must block until its work is done) once under ``jax.profiler`` and returns
    :func:`device_events` of the trace (kept in ``trace_dir``; default a temporary directory)."""
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="trace_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        run()
    return device_events(trace_dir)


def busy_time(xs: list[dict]) -> float:
    """Length (us) of the union of the events' intervals: the time the device was running anything."""
    total, end = 0.0, -1e30
    for e in sorted(xs, key=lambda e: e["ts"]):
        s, t = e["ts"], e["ts"] + e.get("dur", 0.0)
        if t <= end:
            continue
        total += t - max(s, end)
        end = t
    return total


def traced_device_us(run, calls: int, trace_dir: str | None = None) -> dict | None:
    """Runs ``run()`` (which must block until its work is done) once under ``jax.profiler`` and returns
    the device time per call, ``run`` making ``calls`` calls: ``busy_us`` (union of kernel intervals),
    ``kernels`` (kernel launches per call), ``by_name`` ({kernel name: us per call}). None where the
    trace has no device stream (CPU)."""
    xs, _ = trace_events(run, trace_dir)
    if not xs:
        return None
    by_name: dict[str, float] = {}
    for e in xs:
        by_name[e["name"]] = by_name.get(e["name"], 0.0) + e.get("dur", 0.0) / calls
    return {"busy_us": busy_time(xs) / calls, "kernels": len(xs) / calls, "by_name": by_name}
