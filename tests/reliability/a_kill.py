"""Helpers of tests/reliability/test_a_*.py: forked child processes that are stopped with a real SIGKILL, at a
named instant of io.publish (its private test hooks) or at a random one, and checks that a directory is whole."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from lorakit.io import publish

LEFTOVER = re.compile(r"lorakit-(tmp|old|lock)|^\.tmp-")


def fork(work: Callable[[], None], point: str | None = None, signal_file: Path | None = None,
         exchange: bool = True) -> int:
    """Run work() in a forked child; with `point`, the child stops there (io.publish._PAUSE_AT) and this returns
    once it has reached it. The child never returns into pytest."""
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            publish._EXCHANGE = exchange
            publish._PAUSE_AT = {point: str(signal_file)} if point else {}
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    if point is not None:
        deadline = time.monotonic() + 60
        while not signal_file.exists():
            done, status = os.waitpid(pid, os.WNOHANG)
            assert done == 0, f"the child ended (status {status}) before reaching {point!r}"
            assert time.monotonic() < deadline, f"the child did not reach {point!r}"
            time.sleep(0.005)
        signal_file.unlink()
    return pid


def kill(pid: int) -> None:
    """kill -9 the child and reap it."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def dead_pid() -> int:
    """The pid of a process that has ended (forked, exited and reaped)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def leftovers(*directories: Path) -> list[str]:
    """Temporary entries and lock files of lorakit in the directories."""
    return sorted(p.name for d in directories if d.is_dir() for p in d.iterdir() if LEFTOVER.search(p.name))


def snapshot(directory: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory`."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}
