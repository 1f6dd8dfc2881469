"""Directory locks between processes: a lock file beside the directory, `<parent>/.<name>.lorakit-lock`, holding
the owner's pid, host and start time, so a second save / merge / run into the same directory is refused by name.

    runs/x/                      the directory being written
    runs/.x.lorakit-lock         {"pid": 4242, "host": "node1", "process_start": "81234", "started": "...", ...}

Written under a temporary name and linked into place (atomic, never empty); removed in a `finally`. A lock is
stale, and is taken over, when its owner is on this host and its pid is dead, or the pid now belongs to another process (the process start time in
the lock differs from the live one's). A lock from another host is never taken over (its owner cannot be checked
from here): the error says which host and which file to delete once that process is gone. A lock file that
cannot be parsed (not lorakit's, or damaged) is stale once it is older than `UNREADABLE_GRACE_S`.
Inside one process the lock is re-entrant for the thread that holds it; another thread is refused too.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import DirectoryLockedError

LOCK_SUFFIX = ".lorakit-lock"
UNREADABLE_GRACE_S = 10.0  # a lock file without readable content younger than this may still be being written


@dataclass(frozen=True)
class LockOwner:
    pid: int  # process id of the owner
    host: str  # socket.gethostname() of the owner
    process_start: str | None  # the owner's start time in clock ticks (/proc/<pid>/stat), None where unknown
    started: str  # when the lock was taken, UTC ISO 8601
    purpose: str  # what the owner is doing ("save_adapter", "lorakit train", ...)


_HELD: dict[Path, list[int]] = {}  # lock file -> [thread ident, depth] for the locks this process holds
_HELD_GUARD = threading.Lock()


def lock_path(directory: str | Path) -> Path:
    """The lock file of `directory`: `<parent>/.<name>.lorakit-lock` (beside it, so a swap never moves it); inside
    it, `<directory>/.lorakit-lock`, for a directory that is never swapped (a mount point, a read-only parent)."""
    resolved = Path(os.path.abspath(directory))
    if resolved.is_dir() and (os.path.ismount(resolved) or not os.access(resolved.parent, os.W_OK)):
        return resolved / LOCK_SUFFIX
    return resolved.parent / f".{resolved.name}{LOCK_SUFFIX}"


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the command name (field 2) may hold spaces


def process_alive(pid: int) -> bool:
    """True when a process with this pid exists on this host (signal 0 is delivered or refused for lack of rights)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def owner_alive(owner: LockOwner) -> bool:
    """Whether the lock's owner may still be running: always True for another host (it cannot be checked)."""
    if owner.host != socket.gethostname():
        return True
    if not process_alive(owner.pid):
        return False
    live_start = process_start(owner.pid)
    return owner.process_start is None or live_start is None or live_start == owner.process_start


def read_owner(path: Path) -> LockOwner | None:
    """The owner written in lock file `path`, or None when it is missing or cannot be parsed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockOwner(pid=int(data["pid"]), host=str(data["host"]), process_start=data.get("process_start"),
                         started=str(data.get("started", "?")), purpose=str(data.get("purpose", "?")))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


def _describe(directory: Path, path: Path, owner: LockOwner | None) -> str:
    if owner is None:
        return (f"{directory} is being written by another lorakit process: its lock file {path} is being "
                f"created; try again in a few seconds")
    where = "this host" if owner.host == socket.gethostname() else f"host {owner.host!r}"
    return (f"{directory} is in use by another lorakit process ({owner.purpose}, pid {owner.pid} on {where}, "
            f"since {owner.started}); lock file {path}. Wait for it to finish, or write elsewhere; if that process "
            f"is gone, delete the lock file")


def _create(path: Path, purpose: str) -> bool:
    """Create lock file `path` for this process; False when it already exists."""
    owner = LockOwner(pid=os.getpid(), host=socket.gethostname(), process_start=process_start(os.getpid()),
                      started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), purpose=purpose)
    # written whole under a temporary name (swept by io.publish if a kill leaves it), then linked to the lock's
    # name: link() creates it atomically, WITH its content, or fails when it exists (no lock is ever empty)
    tmp = path.with_name(f"{path.name[:-len(LOCK_SUFFIX)]}.lorakit-tmp-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, json.dumps(asdict(owner)).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _is_stale(path: Path, owner: LockOwner | None) -> bool:
    if owner is None:
        try:
            return time.time() - path.stat().st_mtime > UNREADABLE_GRACE_S
        except FileNotFoundError:
            return True  # released meanwhile
    if owner.pid == os.getpid() and owner.host == socket.gethostname():
        return path not in _HELD  # this process's own lock that it no longer tracks (e.g. a forked parent's)
    return not owner_alive(owner)


def _take_over(path: Path, seen: LockOwner | None) -> bool:
    """Remove the stale lock `path` whose owner was `seen`; False when a new owner replaced it meanwhile (then it
    is put back). The lock is renamed aside first and checked there, so a fresh lock is never deleted."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # released or taken over by another process meanwhile: try to create it again
    if read_owner(aside) != seen:
        try:
            os.link(aside, path)  # a live owner's lock: put it back (fails only if yet another one exists)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def acquire(directory: str | Path, purpose: str) -> Path:
    """Take the lock of `directory` for this process and thread (re-entrant for that thread); returns the lock file.

    Raises:
        DirectoryLockedError: another live process, or another thread of this one, holds it (the message names
            the directory, the lock file, the owner's pid, host and purpose).
    """
    directory = Path(os.path.abspath(directory))
    path = lock_path(directory)
    with _HELD_GUARD:
        held = _HELD.get(path)
        if held is not None:
            if held[0] != threading.get_ident():
                raise DirectoryLockedError(f"{directory} is being written by another thread of this process "
                                           f"(lock file {path}); lorakit does not write one directory from two "
                                           f"threads at once")
            held[1] += 1
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if _create(path, purpose):
                _HELD[path] = [threading.get_ident(), 1]
                return path
            owner = read_owner(path)
            if not _is_stale(path, owner) or not _take_over(path, owner):
                raise DirectoryLockedError(_describe(directory, path, read_owner(path) or owner))
        raise DirectoryLockedError(_describe(directory, path, read_owner(path)))


def release(path: Path) -> None:
    """Release one level of the lock `acquire` returned; the file is removed when the outermost level ends."""
    with _HELD_GUARD:
        held = _HELD.get(path)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[path]
        owner = read_owner(path)
        if owner is not None and owner.pid == os.getpid():
            path.unlink(missing_ok=True)


@contextmanager
def directory_lock(directory: str | Path, purpose: str) -> Iterator[Path]:
    """Hold the lock of `directory` inside the block (see `acquire`); yields the lock file.

    Raises:
        DirectoryLockedError: see `acquire`.
    """
    path = acquire(directory, purpose)
    try:
        yield path
    finally:
        release(path)
