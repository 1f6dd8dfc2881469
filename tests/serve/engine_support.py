"""Shared pieces of the engine tests (tests/serve/test_engine*.py): a tiny Llama (fp32) with three LoRA adapters
of random non-zero factors, the reference outputs of `lorakit generate`, and a fake AdapterRegistry.

The fake registry has acquire / release / poll as AdapterRegistry has them, over adapters attached up front; it
can answer "loading" for a number of calls, and can hold the engine at the start of each step, so a test decides
exactly which sequences join at which step.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import lorakit
from conftest import randomize_adapters
from lorakit.generation import generate
from lorakit.mixed import BASE
from lorakit.serve import SamplingParams
from lorakit.serve.engine import Engine
from model_dirs import make_causal_lm_dir

GREEDY = SamplingParams(max_tokens=12, temperature=0)
PROMPTS = {"a": "the cat is", "b": "one two three", BASE: "hello world", "c": "what is the answer"}


@dataclass(frozen=True)
class Target:
    """What AdapterRegistry.resolve returns (the engine reads `served` and hands the target to acquire)."""

    served: str
    adapters: tuple[tuple[str, float], ...] = ()


def target(name: str) -> Target:
    return Target("base", ()) if name == BASE else Target(name, ((name, 1.0),))


class FakeRegistry:
    """acquire / release / poll as AdapterRegistry has them, over adapters attached up front. `loading[name]`
    acquire calls answer None first (a background load); with `hold()`, each step waits for `step()`."""

    def __init__(self) -> None:
        self.loading: dict[str, int] = {}
        self.pins: Counter[str] = Counter()
        self.acquired: list[str] = []
        self.released: list[str] = []
        self.polls = 0  # poll() calls: one per engine step
        self.held = False  # the engine waits in poll() for step()
        self.gate: threading.Semaphore | None = None

    def poll(self) -> None:
        self.polls += 1
        gate = self.gate
        if gate is not None:
            self.held = True
            gate.acquire()
            self.held = False

    def acquire(self, tgt: Target) -> str | None:
        name = tgt.adapters[0][0] if tgt.adapters else BASE
        if name == "broken":
            raise OSError("adapter_model.safetensors: truncated file")
        if self.loading.get(name, 0) > 0:
            self.loading[name] -= 1
            return None
        self.pins[name] += 1
        self.acquired.append(name)
        return name

    def release(self, name: str) -> None:
        self.pins[name] -= 1
        self.released.append(name)

    def hold(self) -> None:
        self.gate = threading.Semaphore(0)

    def step(self, engine: Engine, n: int = 1) -> None:
        """Let the held engine run `n` steps; return when it waits at the next one (or has nothing left)."""
        assert self.gate is not None
        for _ in range(n):
            self._until(engine, lambda: self.held)
            start = self.polls
            self.gate.release()
            self._until(engine, lambda start=start: self.held and self.polls > start)

    @staticmethod
    def _until(engine: Engine, condition) -> None:
        """Wait for `condition`, or for the engine to have nothing running or waiting."""
        deadline = time.monotonic() + 10
        while not condition():
            stats = engine.stats
            if not (stats["running"] or stats["waiting"]):
                return
            assert time.monotonic() < deadline, "the engine did not come back to the start of a step"
            time.sleep(0.001)

    def release_all(self) -> None:
        gate, self.gate = self.gate, None
        if gate is not None:
            for _ in range(10_000):
                gate.release()


def build_served(tmp_path_factory):
    """A tiny Llama (fp32) with adapters a, b, c (different ranks, random non-zero A and B) and its tokenizer,
    plus the reference greedy outputs of `lorakit generate` for each prompt above."""
    path = make_causal_lm_dir(tmp_path_factory.mktemp("serve_lm"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    for name, rank in (("a", 2), ("b", 8), ("c", 4)):
        cfg = lorakit.LoraConfig(r=rank, alpha=2 * rank, target_modules=["q_proj", "v_proj", "down_proj"])
        lorakit.attach(model, cfg, name=name)
    randomize_adapters(model, std=0.3)
    model.eval()
    return model, tokenizer


def reference(model, tokenizer, prompt: str, adapter: str, max_new_tokens: int) -> tuple[str, list[int]]:
    """`lorakit generate`'s text, and the greedy token ids of the same generate call, with only `adapter`
    active (the base model inside `disabled`). Run only while no engine thread uses the model."""

    def run() -> tuple[str, list[int]]:
        text = generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens)
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=model.generation_config.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return text, out[0, ids.shape[1]:].tolist()

    if adapter == BASE:
        with lorakit.disabled(model):
            return run()
    lorakit.set_active(model, adapter)
    return run()


def make_engines(served):
    """Make engines on the shared model; every one is shut down (cancelling) at the end of the test."""
    made: list[tuple[Engine, FakeRegistry]] = []

    def make(registry: FakeRegistry | None = None, **kwargs) -> tuple[Engine, FakeRegistry]:
        registry = registry or FakeRegistry()
        engine = Engine(served[0], served[1], registry, **kwargs)
        engine.start()
        made.append((engine, registry))
        return engine, registry

    yield make
    for engine, registry in made:
        registry.release_all()
        engine.shutdown(drain=False, timeout=10)
        assert not engine.running


def ids_of(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt)["input_ids"]


