"""The serving engine (lorakit.serve.engine): continuous batching across adapters on a tiny Llama (fp32) with
three LoRA adapters of random non-zero factors (engine_support.py).

Greedy sequences for different adapters and the base, joining a running batch at different steps, must give
token for token what `lorakit generate` gives with only that adapter active (or `disabled` for the base);
cancel frees a slot, shutdown drains, a failing forward ends its requests and the engine goes on.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from engine_support import (
    BASE,
    GREEDY,
    PROMPTS,
    FakeRegistry,
    Target,
    build_served,
    ids_of,
    make_engines,
    reference,
    target,
)
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.serve import SamplingParams, ServeError
from lorakit.serve.engine import Engine

served = pytest.fixture(build_served, scope="module", name="served")
engine_for = pytest.fixture(make_engines, name="engine_for")


# -- greedy equality and continuous batching ---------------------------------------------------------------
def test_sequences_joining_a_running_batch_equal_generate(served, engine_for) -> None:
    model, tokenizer = served
    lengths = {"a": 14, "b": 9, BASE: 12, "c": 6}
    expected = {n: reference(model, tokenizer, PROMPTS[n], n, lengths[n]) for n in PROMPTS}
    assert len({tuple(ids) for _, ids in expected.values()}) == 4  # the adapters change what is generated
    engine, registry = engine_for(max_batch=8)
    registry.hold()

    def submit(name: str):
        return engine.submit(ids_of(tokenizer, PROMPTS[name]), target(name),
                             SamplingParams(max_tokens=lengths[name], temperature=0))

    handles = {"a": submit("a")}
    registry.step(engine, 2)  # a runs alone: prefill + decode, then a decode
    assert engine.stats["running"] == 1 and handles["a"].result is None
    handles["b"], handles[BASE] = submit("b"), submit(BASE)  # join a's running batch
    registry.step(engine, 3)
    assert engine.stats["running"] == 3
    handles["c"] = submit("c")
    registry.release_all()
    results = {name: handle.wait(30) for name, handle in handles.items()}
    for name, result in results.items():
        text, ids = expected[name]
        assert result.token_ids == ids, name
        assert result.text == text, name
        ended_by_eos = ids[-1] == model.generation_config.eos_token_id
        assert result.finish_reason == ("stop" if ended_by_eos else "length") and result.completion_tokens == len(ids)
    sizes = engine.stats["batch_sizes"]
    assert sizes.get(1, 0) >= 2 and sizes.get(3, 0) >= 1 and sizes.get(4, 0) >= 1, sizes  # joined, decoded together
    assert set(registry.pins.values()) == {0}  # every pin released, none twice
    assert sorted(registry.released) == sorted(PROMPTS)

    for name in PROMPTS:  # each alone gives the same tokens
        alone = engine.submit(ids_of(tokenizer, PROMPTS[name]), target(name),
                              SamplingParams(max_tokens=lengths[name], temperature=0)).wait(30)
        assert alone.token_ids == expected[name][1], name


def test_max_batch_bounds_the_decode_batch(served, engine_for) -> None:
    _, tokenizer = served
    engine, _ = engine_for(max_batch=2)
    handles = [engine.submit(ids_of(tokenizer, PROMPTS[n]), target(n), GREEDY) for n in PROMPTS]
    for handle in handles:
        assert handle.wait(30).finish_reason in ("length", "stop")  # the base prompt meets eos
    assert max(engine.stats["batch_sizes"]) == 2


def test_a_loading_adapter_waits_without_blocking_the_others(served, engine_for) -> None:
    _, tokenizer = served
    registry = FakeRegistry()
    registry.loading["c"] = 10**9  # not resident until the test says so
    engine, _ = engine_for(registry)
    slow = engine.submit(ids_of(tokenizer, PROMPTS["c"]), target("c"), GREEDY)
    fast = engine.submit(ids_of(tokenizer, PROMPTS["a"]), target("a"), GREEDY)
    assert fast.wait(30).finish_reason == "length"
    assert slow.result is None and engine.stats["waiting"] == 1
    registry.loading["c"] = 0
    assert slow.wait(30).finish_reason == "length"



# -- cancel, shutdown, errors ----------------------------------------------------------------------------
def test_cancel_frees_the_slot_and_the_others_go_on(served, engine_for) -> None:
    model, tokenizer = served
    _, expected = reference(model, tokenizer, PROMPTS[BASE], BASE, 30)
    engine, registry = engine_for()
    registry.hold()
    params = SamplingParams(max_tokens=30, temperature=0)
    doomed = engine.submit(ids_of(tokenizer, PROMPTS["a"]), target("a"), params)
    kept = engine.submit(ids_of(tokenizer, PROMPTS[BASE]), target(BASE), params)
    never = engine.submit(ids_of(tokenizer, PROMPTS["c"]), target("c"), params)
    never.cancel()  # cancelled while waiting, before the engine ever looks at it
    registry.step(engine, 2)
    assert engine.stats["running"] == 2
    doomed.cancel()
    registry.step(engine)
    assert engine.stats["running"] == 1
    assert doomed.result.finish_reason == "cancelled" and 0 < doomed.result.completion_tokens < 30
    assert registry.pins["a"] == 0 and "c" not in registry.acquired
    assert never.result.finish_reason == "cancelled" and never.result.token_ids == []
    registry.release_all()
    assert kept.wait(30).token_ids == expected


def test_shutdown_drains_then_refuses(served, engine_for) -> None:
    _, tokenizer = served
    engine, registry = engine_for()
    registry.hold()
    handles = [engine.submit(ids_of(tokenizer, PROMPTS[n]), target(n), GREEDY) for n in PROMPTS]
    registry.step(engine)
    closer = threading.Thread(target=engine.shutdown, kwargs={"drain": True})
    closer.start()
    deadline = time.monotonic() + 10
    while True:  # once shutdown has begun, submit is refused while the running sequences still finish
        try:
            engine.submit(ids_of(tokenizer, "hello"), target("a"), GREEDY).cancel()
        except ServeError as exc:
            assert exc.status == 503 and exc.body()["error"]["message"]
            break
        assert time.monotonic() < deadline
    registry.release_all()
    closer.join(30)
    assert not engine.running
    assert [h.result.finish_reason for h in handles] == ["length", "length", "stop", "length"]  # base: eos


def test_shutdown_without_drain_cancels(served, engine_for) -> None:
    _, tokenizer = served
    engine, registry = engine_for()
    registry.hold()
    handle = engine.submit(ids_of(tokenizer, PROMPTS["a"]), target("a"), SamplingParams(max_tokens=40, temperature=0))
    registry.step(engine)
    registry.release_all()
    engine.shutdown(drain=False)
    assert handle.result.finish_reason == "cancelled" and not engine.running
    assert registry.pins["a"] == 0


def test_errors_end_the_request_and_the_engine_keeps_serving(served, engine_for) -> None:
    model, tokenizer = served
    engine, registry = engine_for()
    broken = engine.submit(ids_of(tokenizer, PROMPTS["a"]), Target("broken", (("broken", 1.0),)), GREEDY).wait(30)
    assert broken.finish_reason == "error" and "truncated file" in broken.error
    unknown = engine.submit(ids_of(tokenizer, PROMPTS["a"]), Target("nope", (("nope", 1.0),)), GREEDY).wait(30)
    assert unknown.finish_reason == "error" and "nope" in unknown.error  # the forward refused the name

    calls = {"n": 0}

    def fail_one_decode(module, args, kwargs):
        if kwargs.get("position_ids") is not None and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError("simulated device fault")

    hook = model.register_forward_pre_hook(fail_one_decode, with_kwargs=True)
    try:
        failed = engine.submit(ids_of(tokenizer, PROMPTS["b"]), target("b"), GREEDY).wait(30)
    finally:
        hook.remove()
    assert failed.finish_reason == "error" and "simulated device fault" in failed.error
    assert failed.completion_tokens == 1  # the prefill's token; the decode failed
    assert dict(registry.pins) == {"nope": 0, "b": 0}  # released after the failed prefill and decode
    assert engine.submit(ids_of(tokenizer, PROMPTS["c"]), target("c"), GREEDY).wait(30).finish_reason == "length"
    assert engine.stats["errors"] == 3


def test_aevents_streams_into_asyncio_and_leaving_early_cancels(served, engine_for) -> None:
    _, tokenizer = served
    engine, _ = engine_for()

    async def consume():
        handle = engine.submit(ids_of(tokenizer, PROMPTS["a"]), target("a"), GREEDY)
        texts = [event.text async for event in handle.aevents()]
        early = engine.submit(ids_of(tokenizer, PROMPTS["b"]), target("b"), SamplingParams(max_tokens=50, temperature=0))
        stream = early.aevents()
        await stream.__anext__()
        await stream.aclose()  # the client went away
        return handle, texts, early

    handle, texts, early = asyncio.run(consume())
    assert "".join(texts) == handle.result.text and len(texts) == GREEDY.max_tokens
    assert early.wait(30).finish_reason == "cancelled"



# -- with the real AdapterRegistry ----------------------------------------------------------------------
def test_with_the_real_registry_paging_and_a_mix(served, tmp_path) -> None:
    """Adapters saved to disk, registered, paged in and out (max_loras=3 for 3 adapters + a mix), all requests at
    once: each equals `lorakit generate` with that adapter (the mix: lorakit.combine's exact combination)."""
    from lorakit.serve.registry import AdapterRegistry

    model, tokenizer = served
    for name in ("a", "b", "c"):
        lorakit.save_adapter(model, tmp_path, name=name)  # -> tmp_path/name/
    lorakit.combine(model, {"a": 0.7, "b": 0.3}, name="ab")
    try:
        prompts = {**PROMPTS, "ab": "the dog is"}
        expected = {n: reference(model, tokenizer, p, n, 10)[1] for n, p in prompts.items()}
    finally:
        lorakit.delete_adapter(model, "ab")
    fresh = AutoModelForCausalLM.from_pretrained(model.name_or_path, dtype=torch.float32).eval()
    registry = AdapterRegistry(fresh, "base", max_loras=3)
    for name in ("a", "b", "c"):
        registry.register(name, tmp_path / name)
    engine = Engine(fresh, tokenizer, registry)
    engine.start()
    try:
        models = {"a": "a", "b": "b", BASE: "base", "c": "c", "ab": "a:0.7+b:0.3"}
        handles = {}
        for name, prompt in prompts.items():
            tgt = registry.resolve(models[name])
            handles[name] = engine.submit(ids_of(tokenizer, prompt), tgt, SamplingParams(max_tokens=10, temperature=0))
        for name, handle in handles.items():
            result = handle.wait(60)
            assert result.error is None and result.token_ids == expected[name], name
            assert handle.served == models[name]
    finally:
        engine.shutdown(timeout=30)
        registry.close()
    stats = registry.stats  # 3 adapters + a mix through 3 slots: something was evicted to make room
    assert stats["loads"] >= 3 and stats["evictions"] >= 1 and stats["mixes"] == 1 and stats["resident"] <= 3



def test_an_adapter_unloaded_after_resolution_ends_its_request_with_404(served, engine_for) -> None:
    """The registry's ServeError at acquire (the adapter was unregistered after the request was resolved) reaches
    the request's last event with its status, so the app answers 404, not 500."""
    from lorakit.serve.app import check_event

    class Gone(FakeRegistry):
        def acquire(self, tgt):
            raise ServeError(404, "The model `a` does not exist. Adapter `a` was unloaded.", code="model_not_found")

    engine, _ = engine_for(Gone())
    handle = engine.submit(ids_of(served[1], PROMPTS["a"]), target("a"), GREEDY)
    last = list(handle.events(timeout=30))[-1]
    assert last.finish_reason == "error" and last.status == 404
    with pytest.raises(ServeError) as raised:
        check_event(last)
    assert raised.value.status == 404 and raised.value.code == "model_not_found"
