"""Atomic publication of a directory (an adapter, a checkpoint, a merged model): every file is written into a
temporary directory beside the target, synced, and swapped in with ONE rename, so a kill -9 at any instant leaves
the old directory or the new one, whole, never a mix.

    runs/x/.adapter.lorakit-tmp-<pid>-<hex8>/     being written (or, after an exchange, the old one being removed)
    runs/x/.adapter.lorakit-old-<pid>-<hex8>/     fallback only: the previous directory, complete, moved aside
    runs/x/adapter/                               the published directory

Linux (glibc >= 2.28): renameat2(RENAME_EXCHANGE) swaps the new directory with the old one in one step, then the
old one (now under the temporary name) is deleted. Elsewhere (or on a file system that refuses the exchange) the
old directory is renamed aside, the new one renamed in, and the aside copy deleted; a kill between those two
renames leaves the target missing and an `.lorakit-old-` copy, which the next save into that parent, or the next
read of the target (io.files.read_config), puts back. Temporary entries whose owner pid is no longer alive are
removed by the next publication into the same parent (never those of a live process). Entries of the old
directory that the new one does not contain (another adapter's sub-directory, a README) are carried over as hard
links when `carry=True`. A directory that cannot be renamed (a mount point, or a read-only parent) is published
entry by entry instead: each file atomically, not the set (`replace_entries`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from ..errors import ConfigError
from .lock import directory_lock, process_alive

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.lorakit-(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}(?:\.tmp)?$")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2

# Test hooks (private; tests/reliability uses them in child processes that are then killed):
#   _EXCHANGE = False forces the rename-aside fallback;
#   _PAUSE_AT[point] = path makes the process write its pid to `path` and sleep forever when it reaches `point`:
#   "before-swap" (the new directory is complete and synced), "fallback-aside" (the old one renamed aside, the new
#   one not yet in), "after-swap" (the new one in place, the old one not yet deleted).
_EXCHANGE = True
_PAUSE_AT: dict[str, str] = {}


def _pause(point: str) -> None:
    signal = _PAUSE_AT.get(point)
    if signal:
        Path(signal).write_text(str(os.getpid()))
        while True:
            time.sleep(60)


def temp_name(name: str, kind: str = "tmp", suffix: str = "") -> str:
    """A temporary entry's name for target `name`: `.<name>.lorakit-<kind>-<pid>-<hex8><suffix>`."""
    return f".{name}.lorakit-{kind}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def _owner_gone(pid: int) -> bool:
    return pid != os.getpid() and not process_alive(pid)


def delete_entry(path: Path) -> None:
    """Remove a file, a symlink or a directory tree (errors inside a tree are ignored)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep_leftovers(parent: str | Path) -> list[Path]:
    """Clean what killed publications left in `parent`: an `.lorakit-old-` copy whose target is missing is put
    back; other temporary entries of dead owners are deleted. Returns the entries removed or restored."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    done: list[Path] = []
    for entry in sorted(parent.iterdir()):
        match = _LEFTOVER.match(entry.name)
        if match is None or not _owner_gone(int(match["pid"])):
            continue
        target = parent / match["name"]
        if match["kind"] == "old" and not os.path.lexists(target):
            try:
                os.rename(entry, target)
            except OSError:
                continue
        else:
            delete_entry(entry)
        done.append(entry)
    return done


def recover(target: str | Path) -> bool:
    """Put back the previous copy of a missing `target` that a killed fallback publication left aside (only when
    its owner is gone). True when something was restored."""
    target = Path(target)
    if os.path.lexists(target) or not target.parent.is_dir():
        return False
    for entry in target.parent.glob(f".{glob_escape(target.name)}.lorakit-old-*"):
        match = _LEFTOVER.match(entry.name)
        if match and match["name"] == target.name and _owner_gone(int(match["pid"])):
            try:
                os.rename(entry, target)
                return True
            except OSError:
                return False
    return False


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def fsync_tree(directory: Path) -> None:
    """Flush every file under `directory`, and the directories themselves, to disk."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_dir(Path(root))


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename in it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _renameat2() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):  # no libc symbol: glibc < 2.28, musl without it
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap the directory entries `a` and `b` atomically (renameat2 RENAME_EXCHANGE). False when the system or
    the file system does not support it (nothing changed then).

    Raises:
        OSError: any other failure of the call.
    """
    if _RENAMEAT2 is None or not _EXCHANGE:
        return False
    result = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(code)}")


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:  # no hard links on this file system, or too many
        shutil.copy2(source, destination)


def carry_entries(old: Path, new: Path) -> None:
    """Give `new` every entry of `old` it does not have (sub-directories, README, tokenizer files), as hard
    links, so the swap keeps them; temporary entries and lock files are not carried."""
    for entry in old.iterdir():
        if os.path.lexists(new / entry.name) or _LEFTOVER.match(entry.name) or ".lorakit-lock" in entry.name:
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def swap_in(tmp: Path, target: Path) -> None:
    """Make the complete directory `tmp` visible at `target` with one rename (see the module docstring); the old
    `target`, if any, is deleted afterwards.

    Raises:
        ConfigError: `target` exists and is not a directory.
    """
    fsync_tree(tmp)
    _pause("before-swap")
    if not os.path.lexists(target):
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return
    if not target.is_dir():
        raise ConfigError(f"{target} exists and is not a directory; expected a directory to write into")
    if exchange(tmp, target):
        fsync_dir(target.parent)
        _pause("after-swap")
        shutil.rmtree(tmp, ignore_errors=True)  # the old directory, under the temporary name
        return
    aside = target.parent / temp_name(target.name, "old")
    os.rename(target, aside)
    _pause("fallback-aside")
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    fsync_dir(target.parent)
    _pause("after-swap")
    trash = target.parent / temp_name(target.name)  # renamed first: an `old` entry is always complete
    os.rename(aside, trash)
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def publishing(target: str | Path, *, carry: bool = True, lock: bool | str | Path = True,
               purpose: str = "save") -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; when the block ends without an exception its
    content replaces `target` all at once (carrying the old entries it lacks when `carry`). On an exception
    the temporary directory is removed and `target` is untouched.

    Args:
        target: the directory to publish (a symlink to a directory publishes where it points).
        carry: keep the old directory's entries the new one does not write (hard links).
        lock: True: hold `target`'s lock (io.lock) for the whole block; a path: hold that directory's lock
            instead; False: none (the caller holds one, e.g. a training run's out directory).
        purpose: what the lock file says the owner is doing.

    Raises:
        DirectoryLockedError: another live process is writing the same directory.
        ConfigError: `target` exists and is not a directory.
    """
    target = Path(os.path.abspath(target))
    if target.is_symlink():
        target = target.resolve()
    if os.path.lexists(target) and not target.is_dir():
        raise ConfigError(f"{target} exists and is not a directory; expected a directory to write into")
    target.parent.mkdir(parents=True, exist_ok=True)
    guard = nullcontext() if lock is False else directory_lock(target if lock is True else lock, purpose)
    in_place = fixed_in_place(target)
    home = target if in_place else target.parent
    with guard:
        sweep_leftovers(home)
        recover(target)
        tmp = home / temp_name(target.name)
        tmp.mkdir()
        try:
            yield tmp
            if in_place:
                replace_entries(tmp, target)
            else:
                if carry and target.is_dir():
                    carry_entries(target, tmp)
                swap_in(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def fixed_in_place(directory: Path) -> bool:
    """True for an existing directory that cannot be renamed: a mount point, or one whose parent is not
    writable. Such a directory is published entry by entry (replace_entries), each entry atomically."""
    return directory.is_dir() and (os.path.ismount(directory) or not os.access(directory.parent, os.W_OK))


def replace_entries(tmp: Path, target: Path) -> None:
    """Move each entry of the complete directory `tmp` (inside `target`) over the same name in `target`: a file
    with one rename, a directory with an exchange (or renamed aside first); then remove `tmp`. Each entry is
    replaced atomically, the set of them is not: the fallback for a directory that cannot itself be renamed."""
    fsync_tree(tmp)
    for entry in sorted(tmp.iterdir()):
        destination = target / entry.name
        if destination.is_dir() and not destination.is_symlink():
            if not exchange(entry, destination):
                aside = target / temp_name(entry.name)
                os.rename(destination, aside)
                os.rename(entry, destination)
                shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(entry, destination)
    fsync_dir(target)
    shutil.rmtree(tmp, ignore_errors=True)
