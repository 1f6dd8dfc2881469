"""What the benchmark ran on: CPU model and counts, library versions, lorakit git commit, date, load.

Read from /proc/cpuinfo, importlib.metadata (no heavy imports in the orchestrator) and git; the torch
thread count actually used is reported by the child processes themselves (see report.py).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def collect_meta(
    threads: int, elapsed_s: float, quick: bool, load_start: tuple[float, ...]
) -> dict[str, Any]:
    """Everything the report header needs, as a JSON-serialisable dict."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--", "src"))
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "threads": threads,
        "load_avg_start": list(load_start),
        "load_avg_end": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "lorakit_commit": commit + (" + uncommitted changes in src/" if dirty else ""),
        "lorakit_subject": _git("log", "-1", "--format=%s"),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": round(elapsed_s),
        "quick": quick,
    }
