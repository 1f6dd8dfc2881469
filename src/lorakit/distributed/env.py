"""The process group of a run under torchrun (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK): detection,
init and teardown (gloo on the CPU, nccl on CUDA, one device per process, a timeout), rank-0 helpers, collectives.

One process (no WORLD_SIZE, or WORLD_SIZE=1): `Dist.single()`, whose collectives do nothing, so a run is unchanged.
"""

from __future__ import annotations

import datetime
import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from .. import errors
from ..errors import ConfigError, LorakitError
from ..loading.options import resolve_device

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun (and other launchers) set in each process


class DistributedError(LorakitError):
    """Another process of a distributed run failed, or a collective (barrier, all-reduce) timed out."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in a run: its global rank, the number of processes and its rank on this machine."""

    rank: int  # 0 .. world_size - 1; rank 0 writes the run's files
    world_size: int  # processes in the run
    local_rank: int  # index of this process on its machine: its GPU is cuda:local_rank


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """RANK / WORLD_SIZE / LOCAL_RANK from the environment; a plain process (none set) is rank 0 of 1.

    Raises:
        ConfigError: a variable that is not an integer, or a rank outside 0 .. WORLD_SIZE - 1.
    """
    environ = os.environ if environ is None else environ
    values = {}
    for name, default in zip(LAUNCH_VARS, ("0", "1", environ.get("RANK", "0")), strict=True):
        text = environ.get(name, default)
        try:
            values[name] = int(text)
        except ValueError:
            raise ConfigError(f"environment variable {name}: expected an integer, found {text!r}") from None
    env = LaunchEnv(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if env.world_size < 1 or not 0 <= env.rank < env.world_size or env.local_rank < 0:
        raise ConfigError(f"environment: expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0, found RANK={env.rank}, "
                          f"WORLD_SIZE={env.world_size}, LOCAL_RANK={env.local_rank}")
    return env


def process_device(name: str, local_rank: int, world_size: int) -> torch.device:
    """The device of this process: --device as on one device; with several processes "auto" / "cuda" mean
    cuda:LOCAL_RANK (the CPU when there is no GPU for auto) and an explicit cuda:N must be cuda:LOCAL_RANK.

    Raises:
        ConfigError: a device that is not there, or cuda:N other than cuda:LOCAL_RANK under a launcher.
    """
    if world_size == 1:
        return resolve_device(name)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    wanted = torch.device("cuda", local_rank)
    if name not in ("auto", "cuda") and torch.device(name) != wanted:
        raise ConfigError(f"--device {name}: with {world_size} processes each one uses cuda:LOCAL_RANK (here "
                          f"cuda:{local_rank}); give --device cuda or auto, and choose GPUs with CUDA_VISIBLE_DEVICES")
    return resolve_device(str(wanted))


class Dist:
    """The collectives a training run needs; on one process every one is a no-op returning its input."""

    def __init__(self, env: LaunchEnv, device: torch.device, timeout_s: float) -> None:
        self.rank, self.world_size, self.local_rank = env.rank, env.world_size, env.local_rank
        self.device, self.timeout_s = device, timeout_s

    @classmethod
    def single(cls, device: torch.device | None = None) -> Dist:
        """The one-process run: rank 0 of 1, nothing communicated."""
        return cls(LaunchEnv(0, 1, 0), device or torch.device("cpu"), 0.0)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, metrics, logs and the final adapter."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every process gets here (at most the timeout)."""
        if self.active:
            with self.failures("a barrier"):
                tdist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """The element-wise sum of `values` over the processes (one all-reduce of a small float64 tensor)."""
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        with self.failures("an all-reduce"):
            tdist.all_reduce(tensor)
        return tensor.tolist()

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value` on every process (pickled; small objects only)."""
        if not self.active:
            return value
        box = [value if self.is_main else None]
        with self.failures("a broadcast"):
            tdist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Copy rank 0's values of `tensors` into every process's (in place)."""
        if not self.active:
            return
        with self.failures("a broadcast"), torch.no_grad():
            for tensor in tensors:
                tdist.broadcast(tensor.data, src=0)

    def on_main(self, fn: Callable[[], Any], share: bool = False) -> Any:
        """Run `fn` on rank 0 only; a LorakitError or OSError it raises is raised on every process (same type
        when it is one of lorakit.errors' or an OSError, else DistributedError, same message), so all stop alike.
        Returns fn's result on rank 0, and on the others too with `share` (else None)."""
        if not self.active:
            return fn()
        result, failure = None, None
        if self.is_main:
            try:
                result = fn()
            except (LorakitError, OSError) as err:
                failure = (type(err), err)
        sent = self.broadcast_object(_portable(failure, result if share else None))
        if failure is not None:
            raise failure[1]
        if sent[0] is not None:
            raise _rebuild(*sent[0])
        return result if self.is_main else sent[1]

    @contextmanager
    def failures(self, what: str, hint: Callable[[], str] | None = None) -> Iterator[None]:
        """A collective that fails (a process died, or the timeout passed) as a DistributedError saying so, with
        hint() (e.g. the checkpoint to resume from) at the end of the message; one process: nothing changes."""
        try:
            yield
        except (tdist.DistError, RuntimeError) as err:
            if not self.active or (not isinstance(err, tdist.DistError) and not _looks_distributed(err)):
                raise
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: {what} failed: another process of the run stopped, or did "
                f"not answer within --ddp-timeout {self.timeout_s:g} s ({' '.join(str(err).split())[:300]})"
                + (hint() if hint else "")) from err

    def _comm_device(self) -> torch.device:
        return self.device if tdist.get_backend() == "nccl" else torch.device("cpu")


def _looks_distributed(err: BaseException) -> bool:
    text = str(err).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


def _portable(failure: tuple[type, BaseException] | None, result: Any) -> tuple[Any, Any]:
    """(failure as (class name, module, message, errno, filename) or None, result): what broadcast_object sends."""
    if failure is None:
        return None, result
    kind, err = failure
    extra = (err.errno, err.strerror, err.filename) if isinstance(err, OSError) else None
    return (kind.__name__, kind.__module__, str(err), extra), None


def _rebuild(name: str, module: str, message: str, extra: Any) -> BaseException:
    """The exception rank 0 raised, made again on another rank: an OSError, one of lorakit.errors' classes, or a
    DistributedError with its message."""
    if extra is not None:
        return OSError(*extra) if extra[2] is not None else OSError(extra[0], extra[1])
    kind = getattr(errors, name, None)
    if module == errors.__name__ and isinstance(kind, type) and issubclass(kind, LorakitError):
        return kind(message)
    try:
        found = getattr(importlib.import_module(module), name)
        if isinstance(found, type) and issubclass(found, LorakitError):
            return found(message)
    except (ImportError, AttributeError, TypeError):
        pass
    return DistributedError(message)


def backend_for(device: torch.device) -> str:
    """nccl for CUDA devices, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def process_group(device_name: str, timeout_s: float, environ: Mapping[str, str] | None = None) -> Iterator[Dist]:
    """The run's Dist: a process group created from the launcher's environment (and destroyed on leaving, also on
    an error), the caller's own when one is already initialised (left as it is), or Dist.single() for one process.

    Raises:
        ConfigError: bad launcher variables or device (see launch_env, process_device).
    """
    env = launch_env(environ)
    if tdist.is_available() and tdist.is_initialized():
        env = LaunchEnv(tdist.get_rank(), tdist.get_world_size(), env.local_rank)
        yield Dist(env, process_device(device_name, env.local_rank, env.world_size), timeout_s)
        return
    device = process_device(device_name, env.local_rank, env.world_size)
    if env.world_size == 1:
        yield Dist(env, device, timeout_s)
        return
    tdist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout_s),
                             device_id=device if device.type == "cuda" else None)
    try:
        yield Dist(env, device, timeout_s)
    finally:
        tdist.destroy_process_group()
