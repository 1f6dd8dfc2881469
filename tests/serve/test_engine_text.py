"""How the engine's sequences end and sample (lorakit.serve.sampling, params, kv): eos, max_tokens and stop strings
with the text they leave, stop strings and partial characters never streamed, seeded sampling independent of the
batch, nucleus sampling, the 400s for bad parameters and prompts, and the left-padded batch cache.
"""

from __future__ import annotations

import pytest
import torch
from engine_support import (
    GREEDY,
    PROMPTS,
    FakeRegistry,
    build_served,
    ids_of,
    make_engines,
    reference,
    target,
)

from lorakit.errors import ConfigError
from lorakit.serve import SamplingParams, ServeError
from lorakit.serve.engine import Engine
from lorakit.serve.kv import BatchCache
from lorakit.serve.sampling import StreamText, eos_token_ids, held_back, nucleus

served = pytest.fixture(build_served, scope="module", name="served")
engine_for = pytest.fixture(make_engines, name="engine_for")


# -- how sequences end ----------------------------------------------------------------------------------
def test_eos_ends_with_stop_like_generate(served, engine_for, monkeypatch) -> None:
    model, tokenizer = served
    _, tokens = reference(model, tokenizer, PROMPTS["b"], "b", 12)
    position = next(i for i, t in enumerate(tokens) if i >= 2 and t not in tokens[:i])
    monkeypatch.setattr(model.generation_config, "eos_token_id", tokens[position])
    text, expected = reference(model, tokenizer, PROMPTS["b"], "b", 12)
    assert expected == tokens[: position + 1]  # generate stops there too
    engine, _ = engine_for()
    result = engine.submit(ids_of(tokenizer, PROMPTS["b"]), target("b"), GREEDY).wait(30)
    assert (result.token_ids, result.text, result.finish_reason) == (expected, text, "stop")


def test_eos_comes_from_the_generation_config_else_the_tokenizer() -> None:
    class Holder:
        def __init__(self, **fields) -> None:
            self.__dict__.update(fields)

    listed = Holder(generation_config=Holder(eos_token_id=[5, 9]))
    assert eos_token_ids(listed, Holder(eos_token_id=3)) == {5, 9}
    assert eos_token_ids(Holder(generation_config=Holder(eos_token_id=None)), Holder(eos_token_id=3)) == {3}
    assert eos_token_ids(Holder(), Holder(eos_token_id=None)) == frozenset()


@pytest.mark.parametrize("stop_is_real", [True, False])
def test_stop_strings_end_the_text_and_are_never_streamed(served, engine_for, stop_is_real: bool) -> None:
    model, tokenizer = served
    full, _ = reference(model, tokenizer, PROMPTS["a"], "a", 12)
    words = full.split(" ")
    i = next(i for i in range(2, len(words)) if words[i] not in words[:i])
    stop = f"{words[i - 1]} {words[i]}" if stop_is_real else f"{words[i - 1]} zebra"
    stop_at = full.find(stop)  # the first occurrence of the pair
    engine, _ = engine_for()
    handle = engine.submit(ids_of(tokenizer, PROMPTS["a"]), target("a"),
                           SamplingParams(max_tokens=12, temperature=0, stop=("never seen", stop)))
    events = list(handle.events(timeout=30))
    streamed = "".join(e.text for e in events)
    if stop_is_real:
        # the stop's first word was held back when it came (it could start the stop string), then dropped
        assert handle.result.text == full[:stop_at] == streamed and 0 < stop_at
        assert handle.result.finish_reason == "stop"
    else:
        assert handle.result.text == full == streamed and handle.result.finish_reason == "length"
    assert [e.finished for e in events] == [False] * (len(events) - 1) + [True]


def test_stream_text_holds_back_partial_characters_and_stop_prefixes() -> None:
    class Pieces:  # "decodes" ids by joining fixed pieces: a 2-token character and a stop string
        table = {1: "ab", 2: "\ufffd", 3: "é", 4: "S", 5: "TOP", 6: "x"}

        def decode(self, ids, skip_special_tokens=True):
            text = "".join(self.table[i] for i in ids)
            return text.replace("\ufffdé", "é")

    stream = StreamText(Pieces(), stop=("STOP",))
    assert [stream.update([1]), stream.update([1, 2]), stream.update([1, 2, 3])] == ["ab", "", "é"]
    assert stream.update([1, 2, 3, 4]) == ""  # "S" may start "STOP"
    assert stream.update([1, 2, 3, 4, 5]) == "" and stream.stopped and stream.text == "abé"
    assert held_back("xxST", ["STOP", "T"]) == 2 and held_back("abc", ["STOP"]) == 0


def byte_level_tokenizer():
    """A byte-level BPE tokenizer (GPT-2's scheme) with few merges, so multi-byte characters span tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(["hello world, the cat sat on the mat"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


@pytest.mark.parametrize("stop", [(), ("wörld",), ("🙂",)])
def test_stream_text_on_byte_level_bpe_equals_the_whole_decoding(stop) -> None:
    tokenizer = byte_level_tokenizer()
    text = "hello wörld, the cat 日本 sat 🙂 on the mat"
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert len(ids) > len(text.split())  # characters really are split across tokens
    stream = StreamText(tokenizer, stop)
    pieces = []
    for n in range(len(ids)):
        pieces.append(stream.update(ids[: n + 1], final=n == len(ids) - 1))
        if not stop:  # each whole character goes out with the token that completes it, not later
            assert stream.text == tokenizer.decode(ids[: n + 1], skip_special_tokens=True).rstrip("\ufffd")
    expected = text[: text.find(stop[0])] if stop else text
    assert "".join(pieces) == stream.text == expected
    assert all("\ufffd" not in piece for piece in pieces) and stream.stopped == bool(stop)


# -- sampling ------------------------------------------------------------------------------------------
def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(served, engine_for) -> None:
    _, tokenizer = served
    engine, registry = engine_for()
    seeded = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.95, seed=7)
    alone = engine.submit(ids_of(tokenizer, PROMPTS["b"]), target("b"), seeded).wait(30).token_ids
    assert engine.stats["batch_sizes"] == {1: 15}
    registry.hold()  # everything below is admitted in one step: the seeded one decodes in a batch of 5
    others = [engine.submit(ids_of(tokenizer, PROMPTS[n]), target(n),
                            SamplingParams(max_tokens=20, temperature=1.0 if n != "c" else 0)) for n in PROMPTS]
    busy = engine.submit(ids_of(tokenizer, PROMPTS["b"]), target("b"), seeded)
    registry.release_all()
    assert busy.wait(30).token_ids == alone
    assert all(o.wait(30).finish_reason in ("length", "stop") for o in others)  # unseeded: eos may come
    assert engine.stats["batch_sizes"].get(5, 0) >= 1
    other_seed = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.95, seed=8)
    assert engine.submit(ids_of(tokenizer, PROMPTS["b"]), target("b"), other_seed).wait(30).token_ids != alone


def test_nucleus_keeps_the_smallest_set_reaching_top_p() -> None:
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert torch.allclose(nucleus(probs, 0.7), torch.tensor([0.0, 0.625, 0.375, 0.0]))
    assert torch.allclose(nucleus(probs, 0.5), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.equal(nucleus(probs, 1.0), probs)



# -- refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("params", "param"), [
    (SamplingParams(max_tokens=0), "max_tokens"),
    (SamplingParams(max_tokens=True), "max_tokens"),
    (SamplingParams(max_tokens=250), "max_tokens"),  # 250 + the prompt exceed the context of 256
    (SamplingParams(temperature=-0.1), "temperature"),
    (SamplingParams(temperature=float("nan")), "temperature"),
    (SamplingParams(temperature=2.5), "temperature"),
    (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(top_p=1.5), "top_p"),
    (SamplingParams(stop=("a", "b", "c", "d", "e")), "stop"),
    (SamplingParams(stop=(3,)), "stop"),  # type: ignore[arg-type]
    (SamplingParams(seed=-1), "seed"),
    (SamplingParams(seed=2**63), "seed"),
])
def test_bad_parameters_are_400_naming_the_parameter(served, params, param) -> None:
    model, tokenizer = served
    engine = Engine(model, tokenizer, FakeRegistry())
    with pytest.raises(ServeError) as caught:
        engine.submit(ids_of(tokenizer, "the cat is big and the dog is small"), target("a"), params)
    assert caught.value.status == 400 and caught.value.body()["error"]["param"] == param
    assert caught.value.body()["error"]["type"] == "invalid_request_error"
    engine.shutdown()


def test_bad_prompts_and_a_training_model_are_refused(served) -> None:
    model, tokenizer = served
    engine = Engine(model, tokenizer, FakeRegistry())
    for prompt in ([], [10**6], [1, "2"], list(range(1, 10)) * 30):
        with pytest.raises(ServeError) as caught:
            engine.submit(prompt, target("a"), SamplingParams(max_tokens=1))
        assert caught.value.status == 400 and caught.value.param == "prompt"
    engine.shutdown()
    with pytest.raises(ServeError) as caught:
        engine.submit(ids_of(tokenizer, "hello"), target("a"), GREEDY)
    assert caught.value.status == 503
    model.train()
    try:
        with pytest.raises(ConfigError, match="eval"):
            Engine(model, tokenizer, FakeRegistry())
    finally:
        model.eval()


def test_batch_cache_pads_on_the_left_and_trims_when_rows_leave() -> None:
    def seq(length: int, fill: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        kv = torch.full((1, 1, length, 2), fill)
        return [(kv, kv.clone())]

    batch = BatchCache()
    batch.add(seq(3, 1.0))
    batch.add(seq(5, 2.0))
    assert batch.pads == [2, 0] and batch.width == 5
    mask, positions = batch.decode_inputs(torch.device("cpu"))
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]] and positions.tolist() == [[3], [5]]
    assert batch.layers[0][0][0, 0, :, 0].tolist() == [0, 0, 1, 1, 1]
    batch.keep([0])
    assert batch.pads == [0] and batch.width == 3 and batch.lengths() == [3]


