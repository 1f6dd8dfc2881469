"""lorakit.serve.registry: adapters checked before they are registered, paged in and out of the model (LRU, pins,
background reads), versions that running sequences keep, and mixes built with lorakit.combine."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch

import lorakit
import lorakit.io.files
from conftest import max_abs_diff, randomize_adapters, tiny_gpt2, tiny_llama, token_ids
from lorakit import model as M
from lorakit.serve import registry as registry_module
from lorakit.serve.params import ServeError
from lorakit.serve.registry import AdapterRegistry, Target
from lorakit.serve.router import Router

BASE_NAME = "tiny"
WAIT = 10.0  # seconds poll() may wait for a background read (tiny files: milliseconds)


def save_lora(directory: Path, model=None, seed: int = 1, **fields) -> Path:
    """An adapter trained-looking (random A and B) on a tiny Llama, saved in PEFT's layout."""
    model = model if model is not None else tiny_llama()
    config = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"], **fields}
    lorakit.attach(model, lorakit.LoraConfig(**config))
    randomize_adapters(model, seed=seed)
    lorakit.save_adapter(model, directory)
    return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good adapters a, b, c (b: another rank and other modules) and broken ones, saved once for the module."""
    root = tmp_path_factory.mktemp("adapters")
    out = {
        "a": save_lora(root / "a", seed=1),
        "b": save_lora(root / "b", seed=2, r=6, alpha=3.0, target_modules=["q_proj", "o_proj", "down_proj"]),
        "c": save_lora(root / "c", seed=3, r=2, target_modules=["k_proj"]),
        "dora": save_lora(root / "dora", use_dora=True),
        "vera": save_lora(root / "vera", method="vera"),
        "rank16": save_lora(root / "rank16", r=16, alpha=16.0),
        "wrong_shapes": save_lora(root / "wrong_shapes", model=tiny_llama(hidden=48)),
        "other_model": save_lora(root / "other_model", model=tiny_gpt2(), target_modules=["c_attn"]),
        "head_copy": save_lora(root / "head_copy", modules_to_save=["lm_head"]),
    }
    bad_json = shutil.copytree(out["a"], root / "bad_json")
    (bad_json / "adapter_config.json").write_text("{not json")
    nan = shutil.copytree(out["a"], root / "nan")
    tensors = lorakit.io.files.read_weights(nan)
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    lorakit.io.files.write_safetensors(tensors, {"format": "pt"})(nan / "adapter_model.safetensors")
    out.update(bad_json=bad_json, nan=nan, missing=root / "missing", not_a_dir=out["a"] / "adapter_config.json")
    return out


@pytest.fixture
def model():
    return tiny_llama()


def make_registry(model, files, names=("a", "b", "c"), **kwargs) -> AdapterRegistry:
    registry = AdapterRegistry(model, BASE_NAME, router=Router(), **kwargs)
    for name in names:
        registry.register(name, files[name])
    return registry


def acquire_now(registry: AdapterRegistry, target: Target) -> str:
    """acquire, and if the adapter is being read, wait for the read and acquire again."""
    name = registry.acquire(target)
    if name is None:
        registry.poll(timeout=WAIT)
        name = registry.acquire(target)
    assert name is not None
    return name


def logits(model, name: str, ids=None) -> torch.Tensor:
    ids = token_ids(1, 6) if ids is None else ids
    with torch.no_grad():
        return model(ids, adapter_names=[name] * ids.shape[0]).logits


def offline_logits(directories: dict[str, float], ids=None) -> torch.Tensor:
    """A fresh model with base + Σ w_i ΔW_i merged into its weights (lorakit.merge_combination), adapters off."""
    fresh = tiny_llama()
    for i, directory in enumerate(directories):
        lorakit.load_adapter(fresh, directory, name=f"in{i}")
    lorakit.merge_combination(fresh, {f"in{i}": w for i, w in enumerate(directories.values())})
    with lorakit.disabled(fresh), torch.no_grad():
        return fresh(token_ids(1, 6) if ids is None else ids).logits


# -- registration: everything checked first ----------------------------------------------------------------
@pytest.mark.parametrize(("broken", "reason"), [
    ("missing", "no such directory"),
    ("not_a_dir", "not a directory"),
    ("bad_json", "not valid JSON"),
    ("wrong_shapes", "has shape"),
    ("other_model", "does not have"),
    ("rank16", "max-lora-rank 8"),
    ("dora", "method 'dora'"),
    ("vera", "method 'vera'"),
    ("nan", "NaN"),
    ("head_copy", "modules_to_save"),
])
def test_a_bad_adapter_is_a_400_naming_the_reason_and_changes_nothing(model, files, broken, reason):
    registry = make_registry(model, files, names=("a",), max_lora_rank=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ServeError) as caught:
        registry.register("x", files[broken])
    assert caught.value.status == 400
    assert reason in caught.value.message and str(files[broken].name) in caught.value.message
    assert registry.names() == ["a"]
    with pytest.raises(ServeError, match="does not exist"):
        registry.resolve("x")
    assert M.adapter_names(model) == []  # registering attaches nothing; a failed one neither
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["auto", BASE_NAME, "a+b", "a:b", "a b", "__mix", "a.b", "a/b", "", "__base__", 7])
def test_reserved_and_malformed_names_are_refused(model, files, name):
    registry = make_registry(model, files, names=())
    with pytest.raises(ServeError) as caught:
        registry.register(name, files["a"])
    assert caught.value.status == 400 and caught.value.param == "lora_name"
    assert registry.names() == []


def test_re_registering_a_bad_file_keeps_the_old_version(model, files):
    registry = make_registry(model, files, names=("a",))
    with pytest.raises(ServeError):
        registry.register("a", files["wrong_shapes"])
    name = acquire_now(registry, registry.resolve("a"))
    assert name == "a@1"


# -- resolve ------------------------------------------------------------------------------------------------
def test_resolve_base_adapter_and_mix(model, files):
    registry = make_registry(model, files)
    assert registry.resolve(BASE_NAME) == Target(BASE_NAME, ())
    assert registry.resolve("b") == Target("b", (("b", 1.0),))
    assert registry.resolve("a:0.7+b:0.3") == Target("a:0.7+b:0.3", (("a", 0.7), ("b", 0.3)))
    assert registry.resolve("a + c:-0.5") == Target("a + c:-0.5", (("a", 1.0), ("c", -0.5)))
    assert registry.acquire(registry.resolve(BASE_NAME)) == "__base__"


@pytest.mark.parametrize(("model_name", "status"), [
    ("gpt-4", 404), ("", 404), ("llama:7b", 404), ("a:0.5+zzz:0.5", 404),
    ("a:0.7+a:0.3", 400), ("a:nan+b:1", 400), ("a:1e9+b:1", 400), ("a:1", 400), ("a:0.7+", 400),
    ("a:0x1+b:1", 400), ("a:0.2+b:0.3+c:0.5", 400),  # a 3-term mix needs 4 slots; max_loras is 3
    ("auto", 400),  # no adapter has a description
])
def test_resolve_refuses_unknown_models_and_bad_mixes(model, files, model_name, status):
    registry = make_registry(model, files, max_loras=3)
    with pytest.raises(ServeError) as caught:
        registry.resolve(model_name, "some prompt")
    assert caught.value.status == status
    assert caught.value.param == "model"
    if status == 404:
        assert caught.value.code == "model_not_found" and caught.value.type == "invalid_request_error"


# -- residency ------------------------------------------------------------------------------------------------
def test_a_load_happens_in_the_background_and_leaves_the_random_state_alone(model, files, monkeypatch):
    registry = make_registry(model, files)  # register reads the file on the caller's thread, to check it
    threads = []
    real = registry_module.read_tensors
    monkeypatch.setattr(registry_module, "read_tensors",
                        lambda spec: threads.append(threading.current_thread().name) or real(spec))
    rng = torch.get_rng_state()
    target = registry.resolve("a")
    assert registry.acquire(target) is None  # not resident: a read started, the step goes on
    assert M.adapter_names(model) == []
    registry.poll(timeout=WAIT)
    assert M.adapter_names(model) == ["a@1"]  # attached by poll, on this (the engine's) thread
    assert registry.acquire(target) == "a@1"
    assert len(threads) == 1 and threads[0].startswith("lorakit-adapter-loader")
    assert torch.equal(torch.get_rng_state(), rng)
    assert not lorakit.active_adapters(model)  # rows pick adapters through adapter_names only
    expected = tiny_llama()
    lorakit.load_adapter(expected, files["a"])
    with torch.no_grad():
        assert max_abs_diff(logits(model, "a@1"), expected(token_ids(1, 6)).logits) < 1e-5


def test_lru_eviction_with_two_slots(model, files):
    registry = make_registry(model, files, max_loras=2)
    a, b, c = (registry.resolve(n) for n in "abc")
    registry.release(acquire_now(registry, a))
    registry.release(acquire_now(registry, b))
    registry.release(registry.acquire(a))  # a used last: b is now the least recently used
    # hits: every acquire that returned a resident adapter (the two after a load, and a's second)
    assert registry.stats == {"hits": 3, "loads": 2, "evictions": 0, "mixes": 0, "load_failures": 0, "resident": 2}
    assert acquire_now(registry, c) == "c@1"
    assert sorted(M.adapter_names(model)) == ["a@1", "c@1"]
    assert registry.stats["evictions"] == 1 and registry.stats["loads"] == 3
    registry.release("c@1")
    assert acquire_now(registry, b) == "b@1"  # read again from disk; a (LRU now) goes
    assert sorted(M.adapter_names(model)) == ["b@1", "c@1"]
    assert registry.stats["evictions"] == 2 and registry.stats["resident"] == 2


def test_pinned_adapters_are_never_evicted(model, files):
    registry = make_registry(model, files, max_loras=1)
    held = acquire_now(registry, registry.resolve("a"))
    b = registry.resolve("b")
    assert registry.acquire(b) is None
    registry.poll(timeout=WAIT)  # b is read, but the only slot is pinned
    assert registry.acquire(b) is None
    assert M.adapter_names(model) == ["a@1"]
    registry.release(held)
    registry.poll()
    assert M.adapter_names(model) == ["b@1"]
    assert registry.acquire(b) == "b@1"


def test_release_of_an_adapter_nobody_holds_is_an_error(model, files):
    registry = make_registry(model, files)
    registry.release("__base__")  # the base is never pinned
    with pytest.raises(ValueError, match="no sequence holds"):
        registry.release("a@1")


def test_a_file_broken_after_registration_fails_the_request_not_the_server(model, files, tmp_path):
    directory = shutil.copytree(files["a"], tmp_path / "a")
    registry = make_registry(model, files, names=())
    registry.register("a", directory)
    shutil.copy(files["wrong_shapes"] / "adapter_model.safetensors", directory / "adapter_model.safetensors")
    target = registry.resolve("a")
    assert registry.acquire(target) is None
    registry.poll(timeout=WAIT)
    with pytest.raises(ServeError, match="changed since it was registered") as caught:
        registry.acquire(target)
    assert caught.value.status == 400
    assert M.adapter_names(model) == [] and registry.stats["load_failures"] == 1


# -- versions -----------------------------------------------------------------------------------------------
def test_re_registering_keeps_the_old_weights_for_the_sequence_that_holds_them(model, files):
    registry = make_registry(model, files, names=("a",))
    old = acquire_now(registry, registry.resolve("a"))
    before = logits(model, old)
    registry.register("a", files["c"])  # a new file under the same name
    new = acquire_now(registry, registry.resolve("a"))
    assert (old, new) == ("a@1", "a@2")
    assert torch.equal(logits(model, old), before)  # the running sequence's adapter did not change
    expected = tiny_llama()
    lorakit.load_adapter(expected, files["c"])
    with torch.no_grad():
        assert max_abs_diff(logits(model, new), expected(token_ids(1, 6)).logits) < 1e-5
    registry.poll()
    assert "a@1" in M.adapter_names(model)  # still pinned
    registry.release(old)
    registry.poll()
    assert M.adapter_names(model) == ["a@2"]  # the stale version goes once released


def test_unregister_while_running(model, files):
    registry = make_registry(model, files, names=("a", "b"))
    target = registry.resolve("a")
    held = acquire_now(registry, target)
    registry.unregister("a")
    assert registry.names() == ["b"]
    with pytest.raises(ServeError) as caught:
        registry.resolve("a")
    assert caught.value.status == 404
    with pytest.raises(ServeError, match="unloaded"):
        registry.acquire(target)  # resolved before the unload, admitted after it
    assert "a@1" in M.adapter_names(model)
    registry.release(held)
    registry.poll()
    assert "a@1" not in M.adapter_names(model)
    with pytest.raises(ServeError) as caught:
        registry.unregister("a")
    assert caught.value.status == 404


# -- mixes --------------------------------------------------------------------------------------------------
def test_a_mix_serves_the_exact_weighted_sum_and_outlives_its_members(model, files):
    registry = make_registry(model, files, max_loras=3)
    target = registry.resolve("a:0.7+b:-0.3")
    mix = acquire_now(registry, target)
    assert mix.startswith("__mix@") and registry.stats["mixes"] == 1
    expected = offline_logits({files["a"]: 0.7, files["b"]: -0.3})
    assert max_abs_diff(logits(model, mix), expected) < 1e-5
    ids = token_ids(2, 6)  # batched with the base model: the mix's row is unchanged
    with torch.no_grad():
        both = model(ids, adapter_names=[mix, "__base__"]).logits
    assert max_abs_diff(both[:1], offline_logits({files["a"]: 0.7, files["b"]: -0.3}, ids[:1])) < 1e-5
    # c needs a slot: a member (unpinned, least recently used) is evicted, the pinned mix stays and is unchanged
    acquire_now(registry, registry.resolve("c"))
    assert mix in M.adapter_names(model) and len(M.adapter_names(model)) == 3
    assert max_abs_diff(logits(model, mix), expected) < 1e-5
    registry.release(mix)
    assert registry.acquire(target) == mix  # the same mix again: no rebuild
    assert registry.stats["mixes"] == 1


def test_a_mix_over_a_re_registered_member_is_rebuilt(model, files):
    registry = make_registry(model, files, max_loras=4)
    target = registry.resolve("a:0.5+b:0.5")
    old = acquire_now(registry, target)
    registry.register("b", files["c"])
    registry.release(old)
    registry.poll()
    assert old not in M.adapter_names(model)  # stale: its member b@1 is no longer current
    new = acquire_now(registry, target)
    assert new != old
    assert max_abs_diff(logits(model, new), offline_logits({files["a"]: 0.5, files["c"]: 0.5})) < 1e-5


# -- threads ------------------------------------------------------------------------------------------------
def test_registering_from_another_thread_while_the_engine_thread_pages(model, files):
    """An HTTP thread registers and unregisters while this (engine) thread acquires, releases and polls: no error
    but the expected 404s, never more than max_loras adapters attached, and the right weights behind each name."""
    registry = make_registry(model, files, max_loras=2)
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for i in range(15):
                registry.register("c", files["c" if i % 2 else "a"])
                if i % 3 == 0:
                    registry.unregister("c")
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    thread = threading.Thread(target=churn)
    thread.start()
    held: list[str] = []
    while thread.is_alive() or held:
        for name in ("a", "b", "c"):
            try:
                internal = registry.acquire(registry.resolve(name))
            except ServeError as err:
                assert err.status == 404  # c between an unregister and the next register
                continue
            if internal is not None:
                held.append(internal)
        registry.poll()
        assert len(M.adapter_names(model)) <= 2
        while held:
            registry.release(held.pop())
        if not thread.is_alive():
            break
    thread.join()
    assert not errors
    registry.poll()
    assert set(M.adapter_names(model)) <= {"a@1", "b@1", "c@16"}
    name = acquire_now(registry, registry.resolve("c"))
    assert name == "c@16"  # make_registry registered c@1; the last of 15 more: files["a"] (i = 14)
    expected = tiny_llama()
    lorakit.load_adapter(expected, files["a"])
    with torch.no_grad():
        assert max_abs_diff(logits(model, name), expected(token_ids(1, 6)).logits) < 1e-5
