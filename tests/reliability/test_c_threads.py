"""Mixed-adapter batches from several threads at once (issue 15, section 5): each thread's rows get its own
adapters, and a plain forward in one thread never picks up another thread's routing."""

from __future__ import annotations

import threading

import torch

import lorakit
from conftest import randomize_adapters, tiny_llama, token_ids
from lorakit.mixed import BASE

THREADS = 4
ROUNDS = 6
# each thread's per-row assignment; the last thread runs plain forwards (the active adapter "a" for every row)
ASSIGNMENTS = [["a", "b", "c"], ["c", BASE, "a"], ["b", "b", BASE], None]


def _model() -> torch.nn.Module:
    model = tiny_llama(layers=2)
    for name, r in (("a", 2), ("b", 4), ("c", 3)):
        lorakit.attach(model, lorakit.LoraConfig(r=r, alpha=2 * r, target_modules="all-linear"), name=name)
    randomize_adapters(model, std=0.3)
    lorakit.set_active(model, "a")
    return model.eval()


def _run_threads(work) -> list[BaseException]:
    """Run work(i) in THREADS threads started together; return what they raised."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def target(i: int) -> None:
        try:
            barrier.wait()
            work(i)
        except BaseException as err:  # noqa: BLE001 - reported to the main thread
            errors.append(err)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return errors


def test_concurrent_mixed_forwards_give_each_thread_its_own_rows() -> None:
    model = _model()
    ids = token_ids(batch=3, length=12)
    with torch.no_grad():
        reference = [model(input_ids=ids, adapter_names=names).logits if names else model(input_ids=ids).logits
                     for names in ASSIGNMENTS]
    wrong: list[tuple[int, int, float]] = []

    def work(i: int) -> None:
        names = ASSIGNMENTS[i]
        with torch.no_grad():
            for round_ in range(ROUNDS):
                out = model(input_ids=ids, adapter_names=names).logits if names else model(input_ids=ids).logits
                if not torch.allclose(out, reference[i], atol=1e-5, rtol=1e-5):
                    wrong.append((i, round_, float((out - reference[i]).abs().max())))

    assert _run_threads(work) == []
    assert wrong == [], f"(thread, round, max |diff|) of outputs that used another thread's routing: {wrong}"


def test_concurrent_generate_with_adapter_names_keeps_each_threads_names() -> None:
    model = _model()
    model.generation_config.pad_token_id = 0
    ids = token_ids(batch=3, length=5)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        reference = [model.generate(ids, adapter_names=names, **kwargs) if names else model.generate(ids, **kwargs)
                     for names in ASSIGNMENTS]
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(THREADS)}

    def work(i: int) -> None:
        names = ASSIGNMENTS[i]
        with torch.no_grad():
            for _ in range(2):
                out = model.generate(ids, adapter_names=names, **kwargs) if names else model.generate(ids, **kwargs)
                results[i].append(out)

    assert _run_threads(work) == []
    for i, outs in results.items():
        assert all(torch.equal(out, reference[i]) for out in outs), f"thread {i} generated other tokens"
