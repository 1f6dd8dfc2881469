"""The adapters a server knows by name, and which of them are on the model right now: S-LoRA's paging, simplified.

    register("a", dir)        checked in full (serve.validation) before anything changes: version "a@1"
    resolve("a:0.7+b:0.3")    -> Target("a:0.7+b:0.3", (("a", 0.7), ("b", 0.3)))      (any thread)
    acquire(target)           -> "a@1" | "__mix@3" | "__base__" | None (not resident yet)   (engine thread only)
    release("a@1"); poll()                                                               (engine thread only)

Residency: at most `max_loras` adapters (mixes included) are attached to the model. A missing one is read from disk
and checked by one background thread into CPU tensors; the engine thread attaches what is ready (a few tensor
copies) in poll() or acquire(), so a load never holds up running requests for longer than one step. To make room the
least recently used adapter that no running sequence holds (pins) is deleted; when every resident adapter is pinned,
acquire returns None and the request waits.

Versions: a served name maps to its newest version, attached as "<name>@<n>". Registering the name again or
unregistering it never touches a version a running sequence holds; poll() deletes such stale versions once they are
released. A mix "a:0.7+b:0.3" is built from its members' current versions with lorakit.combine's exact
concatenated factors (ΔW = 0.7 ΔW_a + 0.3 ΔW_b, rank r_a + r_b) into an adapter of its own ("__mix@<n>"); its members
need to be resident only while it is built.

Threads: register / unregister / resolve / names / stats may be called from any thread; acquire / release / poll
change the model and run only on the engine thread, between forward passes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import model as M
from ..combine import combine
from ..errors import LorakitError
from ..io.checks import unchanged_on_failure
from ..io.peft import adapter_state
from ..names import BASE
from .model_names import (
    bad_model,
    check_served_name,
    is_mix,
    mix_names,
    not_found,
    parse_mix,
    routing_texts,
    shown,
)
from .params import ServeError
from .router import Router
from .validation import AdapterSpec, check_adapter_dir, module_table, read_tensors

AUTO = "auto"  # the "model" value that routes by embedding
_MIX_PREFIX = "__mix@"  # internal names of mixes; served names never start with "__"


@dataclass(frozen=True)
class Target:
    """What a request's "model" resolved to."""

    served: str  # the name reported back: the base name, an adapter, the mix string, or the adapter "auto" chose
    adapters: tuple[tuple[str, float], ...]  # () = the base model; (("a", 1.0),) = one adapter; a mix: several


@dataclass(frozen=True)
class _Version:
    """One registered version of a served adapter."""

    name: str
    number: int
    spec: AdapterSpec

    @property
    def internal(self) -> str:
        return f"{self.name}@{self.number}"


@dataclass
class _Resident:
    """An adapter attached to the model, with the number of running sequences that hold it."""

    pins: int = 0
    stale: bool = False  # superseded or unregistered (a mix: over such a member): deleted once unpinned


class AdapterRegistry:
    """Named adapters for one base model: validation, LRU residency, versions, mixes and routing.

    Args:
        model: the base model, in eval mode; the registry attaches and deletes adapters on it (engine thread).
        base_name: the name requests use for the base model itself.
        max_loras: the most adapters (mixes included) attached at once.
        max_lora_rank: the highest rank an adapter may have.
        router: routes "auto" (default: a Router on the embedded all-MiniLM-L6-v2, loaded on first use).
    """

    def __init__(self, model: nn.Module, base_name: str, max_loras: int = 8, max_lora_rank: int = 64,
                 router: Router | None = None) -> None:
        for value, what in ((max_loras, "max_loras"), (max_lora_rank, "max_lora_rank")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
        if not isinstance(base_name, str) or not base_name:
            raise ValueError(f"base_name must be a non-empty string, got {base_name!r}")
        self.model = model
        self.base_name = base_name
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.router = router if router is not None else Router()
        self._table = module_table(model)  # taken once: validation never walks the live model
        self._lock = threading.RLock()  # guards everything below; the model itself belongs to the engine thread
        self._register_lock = threading.Lock()  # one register / unregister at a time (router and entries agree)
        self._current: dict[str, _Version] = {}  # served name -> its newest version
        self._numbers: dict[str, int] = {}  # served name -> last version number (kept after unregister)
        self._resident: OrderedDict[str, _Resident] = OrderedDict()  # internal name -> state; LRU first
        self._loading: dict[str, tuple[_Version, Future[dict[str, torch.Tensor]]]] = {}
        self._ready: dict[str, tuple[_Version, dict[str, torch.Tensor]]] = {}  # read, waiting for room
        self._failed: dict[str, ServeError] = {}  # internal name -> why its load failed (raised at acquire)
        self._mixes: dict[tuple[tuple[str, float], ...], str] = {}  # (member internal, weight)... -> mix name
        self._mix_count = 0
        self._counts = {"hits": 0, "loads": 0, "evictions": 0, "mixes": 0, "load_failures": 0}
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-adapter-loader")

    # -- names (any thread) ---------------------------------------------------------------------------------
    def register(self, name: str, path: str | Path, description: str | None = None,
                 examples: Sequence[str] = ()) -> None:
        """Serve the adapter in directory `path` as `name` (a new version if `name` exists: running requests keep
        the old one). Everything is checked, the tensors read, before anything changes.

        Raises:
            ServeError: 400 naming what is wrong: the name (reserved: "auto", the base name, names starting with
                "__", with ':' '+' '.' '/' or whitespace), the directory or its files (serve.validation), the
                description or examples (not strings), or the embedding model for routing is missing.
        """
        check_served_name(name, (AUTO, self.base_name))
        texts = routing_texts(description, examples)
        with self._register_lock:
            spec = check_adapter_dir(path, self._table, self.max_lora_rank)
            read_tensors(spec)  # every value read and checked, then dropped: loads read the file again
            if texts:
                try:
                    self.router.add(name, texts)
                except Exception as err:  # noqa: BLE001 - the package may be missing: say so, keep serving
                    raise ServeError(400, f"adapter {name!r}: cannot embed its description for routing: {err}",
                                     param="description") from err
            else:
                self.router.remove(name)
            with self._lock:
                self._numbers[name] = self._numbers.get(name, 0) + 1
                old = self._current.get(name)
                self._current[name] = _Version(name, self._numbers[name], spec)
                if old is not None:
                    self._retire(old.internal)

    def unregister(self, name: str) -> None:
        """Stop serving `name`; sequences running with it finish with the version they hold.

        Raises:
            ServeError: 404 when `name` is not registered.
        """
        with self._register_lock, self._lock:
            old = self._current.pop(name, None) if isinstance(name, str) else None
            if old is None:
                raise ServeError(404, f"no adapter named {shown(name)} is registered", param="lora_name",
                                 code="model_not_found")
            self._retire(old.internal)
            self.router.remove(name)

    def names(self) -> list[str]:
        """The registered adapter names, in registration order."""
        with self._lock:
            return list(self._current)

    def resolve(self, model: str, prompt: str = "") -> Target:
        """What a request's "model" asks for: the base name, an adapter, a mix "a:0.7+b:0.3", or "auto" (the
        adapter nearest to `prompt`).

        Raises:
            ServeError: 404 (code "model_not_found") for an unknown model or mix member; 400 for a malformed mix,
                a mix with more adapters than --max-loras can hold, or "auto" with no adapter to route to.
        """
        if not isinstance(model, str) or not model.strip():
            raise not_found(str(model))
        if model == self.base_name:
            return Target(model, ())
        if model == AUTO:
            return self._route(prompt)
        with self._lock:
            if model in self._current:
                return Target(model, ((model, 1.0),))
        if "+" not in model and ":" not in model:
            raise not_found(model)
        with self._lock:  # unknown names first: "llama:7b" is a model that does not exist, not a bad weight
            unknown = [n for n in mix_names(model) if n and n not in self._current]
        if unknown:
            raise not_found(model, "" if unknown == [model] else f" Its adapter `{unknown[0]}` is not registered.")
        terms = parse_mix(model)
        if len(terms) + 1 > self.max_loras:
            raise bad_model(f"mix {shown(model)} needs {len(terms) + 1} resident adapters at once (its {len(terms)} "
                             f"members and itself), but the server holds at most {self.max_loras} (--max-loras)")
        return Target(model, terms)

    @property
    def stats(self) -> dict[str, int]:
        """Counters for /metrics: hits (acquires that returned a resident adapter, including a waiting sequence's
        admission once its load is done), loads (adapters read from disk and attached), evictions (unpinned adapters
        deleted to make room; stale versions are not counted), mixes (combinations built), load_failures,
        resident (adapters and mixes attached now)."""
        with self._lock:
            return {**self._counts, "resident": len(self._resident)}

    def close(self) -> None:
        """Stop the loader thread (pending reads are dropped)."""
        self._loader.shutdown(wait=True, cancel_futures=True)

    # -- residency (engine thread only) ---------------------------------------------------------------------
    def acquire(self, target: Target) -> str | None:
        """The internal adapter name for a sequence of `target`, pinned until release(); "__base__" for the base;
        None when it is not resident yet (its load has been started: ask again at a later step).

        Raises:
            ServeError: 404 when an adapter of `target` was unregistered since it was resolved; 400 when its file
                could not be loaded (it changed on disk since it was registered).
        """
        if not target.adapters:
            return BASE
        with self._lock:
            self._collect()  # loads that finished since the last call (not one started by this call)
            versions = []
            for name, _ in target.adapters:
                if name not in self._current:
                    raise not_found(target.served, f" Adapter `{name}` was unloaded.")
                versions.append(self._current[name])
            if not is_mix(target.adapters):
                hit = versions[0].internal in self._resident
                internal = versions[0].internal if self._make_resident(versions[0]) else None
            else:
                key = tuple((v.internal, w) for v, (_, w) in zip(versions, target.adapters))
                hit = self._mixes.get(key) in self._resident
                internal = self._make_mix(key)
            if internal is None:
                return None
            self._counts["hits"] += hit
            self._resident[internal].pins += 1
            self._resident.move_to_end(internal)
            return internal

    def release(self, internal: str) -> None:
        """A sequence holding `internal` (from acquire) is done with it.

        Raises:
            ValueError: `internal` is not a pinned resident adapter (released more often than acquired).
        """
        if internal == BASE:
            return
        with self._lock:
            state = self._resident.get(internal)
            if state is None or state.pins < 1:
                raise ValueError(f"release({internal!r}): no sequence holds this adapter")
            state.pins -= 1
            if state.pins == 0 and state.stale:
                self._delete(internal)

    def poll(self, timeout: float = 0.0) -> None:
        """Attach what the loader has read (making room by LRU eviction) and delete stale versions no sequence
        holds. `timeout`: wait up to this many seconds for reads in flight first (tests; the engine passes 0)."""
        with self._lock:
            pending = [future for _, future in self._loading.values()]
        if timeout > 0 and pending:
            wait_futures(pending, timeout=timeout)
        with self._lock:
            self._collect()
            for internal in [i for i, s in self._resident.items() if s.stale and s.pins == 0]:
                self._delete(internal)
            for version, _ in list(self._ready.values()):
                try:
                    if not self._make_resident(version):
                        break  # no room: everything resident is pinned
                except ServeError as err:  # reported to the next acquire of this version
                    self._failed[version.internal] = err

    # -- internals (lock held) ------------------------------------------------------------------------------
    def _route(self, prompt: str) -> Target:
        if not self.router.names():
            raise bad_model("model 'auto' routes each request to the adapter whose description or example prompts "
                             "are nearest to it, and no registered adapter has any; register adapters with a "
                             "description or examples, or name a model")
        try:
            name, _ = self.router.route(prompt if isinstance(prompt, str) else "")
        except LookupError as err:  # the last described adapter went away meanwhile
            raise bad_model(f"model 'auto': {err}") from err
        return Target(name, ((name, 1.0),))

    def _retire(self, internal: str) -> None:
        """A version stops being current: stale if resident (with every mix built on it), never loaded again."""
        self._ready.pop(internal, None)
        self._failed.pop(internal, None)
        loading = self._loading.pop(internal, None)
        if loading is not None:
            loading[1].cancel()
        for key, mix in list(self._mixes.items()):
            if any(member == internal for member, _ in key):
                del self._mixes[key]
                if mix in self._resident:
                    self._resident[mix].stale = True
        if internal in self._resident:
            self._resident[internal].stale = True

    def _collect(self) -> None:
        """Move finished background reads to _ready (or _failed) if their version is still current."""
        for internal, (version, future) in list(self._loading.items()):
            if not future.done():
                continue
            del self._loading[internal]
            if future.cancelled() or self._current.get(version.name) is not version:
                continue
            error = future.exception()
            if error is None:
                self._ready[internal] = (version, future.result())
            else:
                self._counts["load_failures"] += 1
                self._failed[internal] = error if isinstance(error, ServeError) else ServeError(
                    400, f"adapter {version.name!r}: reading {version.spec.directory} failed: {error}")

    def _make_resident(self, version: _Version) -> bool:
        """Whether `version` is attached now: attach it if it was read and there is room, else start its read."""
        internal = version.internal
        if internal in self._resident:
            return True
        if internal in self._failed:
            raise self._failed.pop(internal)  # the next request tries to read it again
        if internal in self._ready:
            if not self._make_room():
                return False
            _, tensors = self._ready.pop(internal)
            self._attach(version, tensors)
            return True
        if internal not in self._loading:
            self._loading[internal] = (version, self._loader.submit(read_tensors, version.spec))
        return False

    def _make_mix(self, key: tuple[tuple[str, float], ...]) -> str | None:
        """The resident mix of `key` ((member internal name, weight), ...), built now if its members are all
        resident (their loads are started otherwise: None)."""
        mix = self._mixes.get(key)
        if mix is not None and mix in self._resident:
            return mix
        versions = [self._version_of(internal) for internal, _ in key]
        held: list[str] = []
        try:
            for version in versions:  # each member pinned while the next ones make room
                if self._make_resident(version):
                    self._resident[version.internal].pins += 1
                    held.append(version.internal)
            if len(held) < len(versions) or not self._make_room():
                return None
            self._mix_count += 1
            mix = f"{_MIX_PREFIX}{self._mix_count}"
            try:
                with _rng_kept(self.model), unchanged_on_failure(self.model, mix):
                    combine(self.model, dict(key), name=mix)  # exact: concatenated factors (method "linear")
                    M.set_active(self.model, [])
                    M.set_trainable(self.model, mix, False)
            except LorakitError as err:
                raise bad_model(f"the mix of {', '.join(n for n, _ in key)} cannot be built: {err}") from err
            self._resident[mix] = _Resident()
            self._mixes[key] = mix
            self._counts["mixes"] += 1
            return mix
        finally:
            for internal in held:
                self._resident[internal].pins -= 1

    def _version_of(self, internal: str) -> _Version:
        """The current version whose internal name is `internal` (the caller took it from _current)."""
        name = internal.rpartition("@")[0]
        return self._current[name]

    def _make_room(self) -> bool:
        """Free one slot if none is free: a stale unpinned adapter first, else the least recently used unpinned
        one. False when every resident adapter is pinned."""
        if len(self._resident) < self.max_loras:
            return True
        unpinned = [i for i, s in self._resident.items() if s.pins == 0]  # LRU first
        if not unpinned:
            return False
        victim = next((i for i in unpinned if self._resident[i].stale), unpinned[0])
        if not self._resident[victim].stale:
            self._counts["evictions"] += 1
        self._delete(victim)
        return True

    def _attach(self, version: _Version, tensors: dict[str, torch.Tensor]) -> None:
        """Attach `version` from tensors already read and checked (no disk access), inactive and frozen."""
        internal = version.internal
        try:
            # attach draws an init that the copy overwrites: the global random state is kept as it was
            with _rng_kept(self.model), unchanged_on_failure(self.model, internal), torch.no_grad():
                M.attach_at(self.model, version.spec.config, internal, list(version.spec.modules),
                            init_from_base=False)
                M.set_active(self.model, [])  # rows choose their adapter through adapter_names only
                M.set_trainable(self.model, internal, False)
                for key, target in adapter_state(self.model, internal).items():
                    target.copy_(tensors[key])
        except (LorakitError, KeyError, RuntimeError) as err:
            raise ServeError(400, f"adapter {version.name!r} could not be attached: {err}") from err
        self._resident[internal] = _Resident()
        self._counts["loads"] += 1

    def _delete(self, internal: str) -> None:
        """Detach `internal` from the model (an eviction, or a stale version no sequence holds)."""
        del self._resident[internal]
        for key, mix in list(self._mixes.items()):
            if mix == internal:
                del self._mixes[key]
        if internal in M.adapter_names(self.model):
            M.delete_adapter(self.model, internal)


@contextmanager
def _rng_kept(model: nn.Module) -> Iterator[None]:
    """Keep torch's global random state (the CPU's, and the model's CUDA device's) as it was across an attach."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
