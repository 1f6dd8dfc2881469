"""The serving engine: continuous batching of sequences for many adapters over one base model (Orca-style
iteration-level scheduling, Yu et al. OSDI 2022; one batch across adapters as in S-LoRA, arXiv:2311.03285).

One engine thread owns the model. Each step:

    registry.poll()                        finish background adapter loads
    admit   waiting -> running             in arrival order while running < max_batch and the target is resident
                                           (registry.acquire); each newcomer is prefilled alone (batch of one,
                                           its adapter), which gives its KV cache and its first token
    decode  one forward for all running    lorakit's mixed path: adapter_names = one adapter per row; the caches
                                           are left-padded to one length (kv.BatchCache), masked, own positions
    leave   finished / cancelled rows      registry.release; their cache rows are dropped

Greedy decoding is argmax of each row's fp32 logits, so a sequence gets the tokens `lorakit generate` gives for
the same prompt and adapter whatever else is in the batch. Only the engine thread runs forwards or calls
registry.acquire / release / poll; submit, cancel and shutdown are thread-safe.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError
from ..mixed import BASE
from ..model import adapter_names
from . import kv
from .params import SamplingParams, ServeError
from .sampling import StreamText, eos_token_ids, make_generator, next_tokens
from .sequence import SequenceHandle, SequenceResult, TokenEvent

if TYPE_CHECKING:
    from .registry import AdapterRegistry, Target

__all__ = ["Engine", "SequenceHandle", "SequenceResult", "TokenEvent"]

IDLE_WAIT_S = 0.1  # how long the idle engine sleeps between checks that its owner (the main thread) still runs
RETRY_WAIT_S = 0.002  # how long to wait when only sequences whose adapter is still loading wait


def model_context(model: nn.Module) -> int | None:
    """The model's context length (config.max_position_embeddings, GPT-2's n_positions), None when unknown."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def vocab_size(model: nn.Module) -> int:
    """The number of token ids the model's input embedding takes."""
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    return int(embedding.num_embeddings)


@dataclass
class _Sequence:
    """The engine's state of one sequence."""

    handle: SequenceHandle
    prompt_ids: list[int]
    target: Target
    params: SamplingParams
    text: StreamText
    generator: torch.Generator | None = None  # sampled sequences only
    adapter: str | None = None  # the internal adapter name from registry.acquire, once admitted
    token_ids: list[int] = field(default_factory=list)  # generated so far; the last one is not in the cache yet


class Engine:
    """Continuous batching over lorakit's mixed-adapter forward; see the module docstring.

    Args:
        model: a causal LM in eval mode (adapters attached by the registry); only the engine thread uses it.
        tokenizer: its tokenizer (decode, eos_token_id).
        registry: the AdapterRegistry that makes targets resident (acquire / release / poll).
        max_batch: the most sequences decoded together; more wait.
        device: where inputs go; default the model's parameters' device.

    Raises:
        ConfigError: the model is in training mode, or max_batch < 1.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, registry: AdapterRegistry, max_batch: int = 64,
                 device: torch.device | str | None = None) -> None:
        if model.training:
            raise ConfigError("the engine serves a model in eval mode: call model.eval() first")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.registry = registry
        self.max_batch = max_batch
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.context = model_context(model)
        self.vocab = vocab_size(model)
        self.eos = eos_token_ids(model, tokenizer)
        self._cache_arg = kv.cache_argument(model)
        self._prefill_kwargs = {"logits_to_keep": 1} if kv.takes_argument(model, "logits_to_keep") else {}
        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()  # guarded by _cond
        self._running: list[_Sequence] = []  # engine thread only; row i of _batch
        self._batch = kv.BatchCache()  # engine thread only
        self._closing = False  # no more submits
        self._drain = True  # on close: finish what runs (True) or cancel it
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._stats: dict[str, Any] = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "steps": 0,
                                       "prefills": 0, "finished": 0, "cancelled": 0, "errors": 0}
        self._batch_sizes: dict[int, int] = {}  # decode batch size -> number of decode steps of that size

    # -- public, thread-safe ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (once).

        Raises:
            ServeError: 503 after shutdown.
        """
        with self._cond:
            if self._closing:
                raise ServeError(503, "the engine is shut down", type="service_unavailable")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name="lorakit-serve-engine", daemon=False)
            self._thread.start()

    def submit(self, prompt_ids: list[int], target: Target, params: SamplingParams) -> SequenceHandle:
        """Queue a sequence; it is admitted at a coming step. Thread-safe.

        Raises:
            ServeError: 400 for an empty prompt, a token id outside the vocabulary, bad sampling parameters or
                a prompt + max_tokens beyond the model's context; 503 when the engine is shutting down.
        """
        ids = self._check_prompt(prompt_ids)
        params.check(self.context, len(ids))
        handle = SequenceHandle(f"seq-{next(self._ids)}", target.served, len(ids), on_cancel=self._wake)
        generator = None if params.greedy else make_generator(params.seed, self.device)
        seq = _Sequence(handle, ids, target, params, StreamText(self.tokenizer, params.stop), generator)
        with self._cond:
            if self._closing:
                raise ServeError(503, "the server is shutting down: no new requests", type="service_unavailable")
            self._waiting.append(seq)
            self._stats["requests"] += 1
            self._stats["prompt_tokens"] += len(ids)
            self._cond.notify_all()
        return handle

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop admitting requests (submit raises 503); with `drain`, finish the running and waiting sequences
        first, else cancel them; then stop the engine thread. After `timeout` seconds of draining, what is
        left is cancelled. An engine never started has nothing running: what waits is cancelled. Safe to call
        more than once."""
        with self._cond:
            self._closing = True
            self._drain = self._drain and drain
            self._cond.notify_all()
            thread = self._thread
        if thread is None:  # never started: nothing runs, end what waits
            self._end_waiting("cancelled")
            return
        if thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            with self._cond:
                self._drain = False
                self._cond.notify_all()
            thread.join()

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters for /metrics: requests, prompt_tokens, generated_tokens, steps (decode
        forwards), prefills, finished, cancelled, errors, running, waiting, and batch_sizes ({decode batch
        size: number of decode steps of that size})."""
        with self._cond:
            snapshot = dict(self._stats)
            snapshot["running"] = len(self._running)
            snapshot["waiting"] = len(self._waiting)
            snapshot["batch_sizes"] = dict(self._batch_sizes)
        return snapshot

    @property
    def running(self) -> bool:
        """Whether the engine thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    # -- checks -------------------------------------------------------------------------------------------
    def _check_prompt(self, prompt_ids: Any) -> list[int]:
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise ServeError(400, "the prompt is empty: it must have at least one token", param="prompt")
        for i, t in enumerate(prompt_ids):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab:
                raise ServeError(400, f"prompt token {i} is {t!r}: token ids are integers in [0, {self.vocab})",
                                 param="prompt")
        return list(prompt_ids)

    # -- the engine thread --------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _loop(self) -> None:
        """The engine thread: steps while there is work; ends on shutdown (or when the main thread has ended
        without one, so the interpreter can exit)."""
        while True:
            with self._cond:
                while not (self._waiting or self._running or self._closing):
                    self._cond.wait(IDLE_WAIT_S)
                    if not threading.main_thread().is_alive():
                        self._closing, self._drain = True, False
                if self._closing and (not self._drain or not (self._waiting or self._running)):
                    break
            try:
                progressed = self._step()
            except Exception as exc:  # noqa: BLE001 - never die silently: fail what runs, keep serving
                self._end_running("error", f"engine step failed: {type(exc).__name__}: {exc}")
                progressed = False
            if not progressed:
                with self._cond:
                    self._cond.wait(RETRY_WAIT_S)
        self._end_running("cancelled")
        self._end_waiting("cancelled")

    def _step(self) -> bool:
        """One scheduling step; whether anything was computed or ended."""
        try:
            self.registry.poll()
        except Exception:  # noqa: BLE001 - a failed background load is the registry's to report at acquire
            pass
        ended = self._reap_cancelled()
        admitted = self._admit()
        if self._running:
            self._decode()
            return True
        return ended or admitted

    def _reap_cancelled(self) -> bool:
        """End the cancelled sequences, running or waiting."""
        leaving = [i for i, seq in enumerate(self._running) if seq.handle.cancel_requested]
        for i in leaving:
            self._finish(self._running[i], "cancelled")
        if leaving:
            self._keep_rows([i for i in range(len(self._running)) if i not in leaving])
        with self._cond:
            dropped = [seq for seq in self._waiting if seq.handle.cancel_requested]
            for seq in dropped:
                self._waiting.remove(seq)
        for seq in dropped:
            self._finish(seq, "cancelled")
        return bool(leaving or dropped)

    def _admit(self) -> bool:
        """Move waiting sequences whose adapter is resident into the batch, in arrival order; prefill each."""
        with self._cond:
            candidates = list(self._waiting)
        admitted = False
        for seq in candidates:
            if len(self._running) >= self.max_batch:
                break
            try:
                seq.adapter = self.registry.acquire(seq.target)
            except Exception as exc:  # noqa: BLE001 - an adapter that cannot be made resident ends its request
                self._take_waiting(seq)
                status = exc.status if isinstance(exc, ServeError) else None  # unloaded meanwhile, file broken
                self._finish(seq, "error", f"adapter for {seq.target.served!r} could not be loaded: {exc}",
                             status=status)
                admitted = True
                continue
            if seq.adapter is None:  # loading in the background: try again next step, let the others pass
                continue
            self._prefill(seq)
            admitted = True
        return admitted

    def _take_waiting(self, seq: _Sequence, running: bool = False) -> None:
        """Remove `seq` from the waiting queue (and, with `running`, add it to the running list in the same
        breath, so the stats never miss it)."""
        with self._cond:
            self._waiting.remove(seq)
            if running:
                self._running.append(seq)

    def _forward_kwargs(self, names: list[str]) -> dict[str, Any]:
        """adapter_names for a forward: one per row; left out when the model has no adapter at all."""
        if all(n == BASE for n in names) and not adapter_names(self.model):
            return {}
        return {"adapter_names": names}

    def _prefill(self, seq: _Sequence) -> None:
        """Run the prompt alone with its adapter: its cache joins the batch and its first token is chosen.
        `seq` stays in the waiting queue until then."""
        assert seq.adapter is not None
        ids = torch.tensor([seq.prompt_ids], dtype=torch.int64, device=self.device)  # (1, P)
        try:
            with torch.inference_mode():
                out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                                 **{self._cache_arg: kv.empty_cache()}, **self._prefill_kwargs,
                                 **self._forward_kwargs([seq.adapter]))
            layers = kv.cache_layers(kv.output_cache(out))
            token = next_tokens(out.logits[:, -1, :], [seq.params], [seq.generator])[0]
        except Exception as exc:  # noqa: BLE001 - the request fails, the engine keeps serving
            self._take_waiting(seq)
            self._finish(seq, "error", f"prefill failed: {type(exc).__name__}: {exc}")
            return
        self._take_waiting(seq, running=True)
        self._batch.add(layers)
        with self._cond:
            self._stats["prefills"] += 1
        if self._advance(seq, token):
            self._keep_rows(list(range(len(self._running) - 1)))

    def _decode(self) -> None:
        """One forward for every running sequence (its pending token, its adapter), then the next tokens."""
        rows = self._running
        tokens = torch.tensor([[seq.token_ids[-1]] for seq in rows], dtype=torch.int64, device=self.device)  # (B, 1)
        mask, positions = self._batch.decode_inputs(self.device)  # (B, W + 1), (B, 1)
        names = [seq.adapter or BASE for seq in rows]
        try:
            with torch.inference_mode():
                out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                                 **{self._cache_arg: self._batch.cache()}, **self._forward_kwargs(names))
            self._batch.update(kv.output_cache(out))
            chosen = next_tokens(out.logits[:, -1, :], [s.params for s in rows], [s.generator for s in rows])
        except Exception as exc:  # noqa: BLE001 - the batch's requests fail, the engine keeps serving
            message = f"decode step failed: {type(exc).__name__}: {exc}"
            for seq in rows:
                self._finish(seq, "error", message)
            self._keep_rows([])
            return
        with self._cond:
            self._stats["steps"] += 1
            self._batch_sizes[len(rows)] = self._batch_sizes.get(len(rows), 0) + 1
        staying = [i for i, (seq, token) in enumerate(zip(rows, chosen)) if not self._advance(seq, token)]
        self._keep_rows(staying)

    def _keep_rows(self, rows: list[int]) -> None:
        """Keep only these running sequences (their cache rows too)."""
        kept = [self._running[i] for i in rows]
        with self._cond:
            self._running = kept
        self._batch.keep(rows)

    def _advance(self, seq: _Sequence, token: int) -> bool:
        """Append `token` to `seq`, send its event; whether the sequence ended (eos, stop string, max_tokens)."""
        seq.token_ids.append(token)
        with self._cond:
            self._stats["generated_tokens"] += 1
        reason = None
        if token in self.eos:
            reason = "stop"
        elif len(seq.token_ids) >= seq.params.max_tokens:
            reason = "length"
        piece = seq.text.update(seq.token_ids, final=reason is not None)
        if seq.text.stopped:
            reason = "stop"
        if reason is None:
            seq.handle.deliver(TokenEvent(piece, token, False))
            return False
        self._finish(seq, reason, piece=piece, token=token)
        return True

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None, piece: str = "",
                token: int | None = None, status: int | None = None) -> None:
        """Send `seq`'s last event (with `status`: an error the request caused), record its result, release its
        adapter."""
        result = SequenceResult(seq.text.text, list(seq.token_ids), reason, error)
        seq.handle.deliver(TokenEvent(piece, token, True, reason, error, status), result)
        key = {"cancelled": "cancelled", "error": "errors"}.get(reason, "finished")
        with self._cond:
            self._stats[key] += 1
        if seq.adapter is not None:
            adapter, seq.adapter = seq.adapter, None
            try:
                self.registry.release(adapter)
            except Exception:  # noqa: BLE001 - a release that fails must not take the engine down
                pass

    def _end_running(self, reason: str, error: str | None = None) -> None:
        for seq in list(self._running):
            self._finish(seq, reason, error)
        self._keep_rows([])

    def _end_waiting(self, reason: str) -> None:
        with self._cond:
            left = list(self._waiting)
            self._waiting.clear()
        for seq in left:
            self._finish(seq, reason)

