"""Peak memory of a piece of work in this process (`lorakit train` and the demo measure whole runs with it), and
the run directory's memory.json that `lorakit report` shows next to `lorakit plan`'s estimate.

PeakMemory resets the kernel's resident-set high-water mark of THIS process (/proc/self/clear_refs) when it
starts, so it is for processes lorakit's CLI owns (`lorakit train`, the demo), not for library calls.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
from pathlib import Path
from typing import Any

import torch

MEMORY_FILE = "memory.json"


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """Peak resident memory of this process between start() and stop(), in bytes.

    On Linux the kernel's high-water mark (VmHWM) is reset by writing 5 to /proc/self/clear_refs; elsewhere a
    thread samples the resident size every 20 ms (psutil, if installed). On a GPU the peak of allocated
    memory is reported too.
    """

    def __init__(self) -> None:
        self._sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.method = ""
        self.start_bytes = 0

    def start(self) -> PeakMemory:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            if _status_kib("VmHWM") is None:
                raise OSError("no VmHWM")
            self.method = "VmHWM"
            self.start_bytes = (_status_kib("VmRSS") or 0) * 1024
        except OSError:
            self.method = "sampled"
            self.start_bytes = self._sample()
            self._sampled = self.start_bytes
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    @staticmethod
    def _sample() -> int:
        try:
            import psutil

            return int(psutil.Process().memory_info().rss)
        except ImportError:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # a lifetime peak: the best there is
            return int(peak) * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB elsewhere

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sampled = max(self._sampled, self._sample())

    def stop(self) -> dict[str, int | str]:
        if self.method == "VmHWM":
            peak = (_status_kib("VmHWM") or 0) * 1024
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            peak = max(self._sampled, self._sample())
        result: dict[str, int | str] = {"peak_rss_bytes": peak, "start_rss_bytes": self.start_bytes,
                                        "peak_rss_growth_bytes": max(0, peak - self.start_bytes),
                                        "memory_method": self.method}
        if torch.cuda.is_available():
            result["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
        return result




def write_memory_json(out_dir: str | Path, measured: dict[str, Any], covers: str) -> Path:
    """Write PeakMemory.stop()'s figures (and what they cover) to out_dir/memory.json, atomically; returns the path."""
    from ..io.files import atomic_write

    text = json.dumps({**measured, "covers": covers}, indent=1) + "\n"
    atomic_write(Path(out_dir), {MEMORY_FILE: lambda path: path.write_text(text, encoding="utf-8")})
    return Path(out_dir) / MEMORY_FILE


def read_memory_json(run_dir: str | Path) -> dict[str, Any] | None:
    """run_dir/memory.json as a dict, or None when there is none or it is unreadable (a report shows no figure)."""
    path = Path(run_dir) / MEMORY_FILE
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None
