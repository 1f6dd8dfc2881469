"""The HTTP app (lorakit.serve.app.create_app) in process, with the real Engine and AdapterRegistry on a tiny
Llama: every route's shape, greedy outputs equal to `lorakit generate`'s, streaming, n, stop, mixes, loading and
unloading, every malformed request as a 4xx in OpenAI's error shape (and the app still serving after), the API
key; plus the pure parts (request parsing, Prometheus text)."""

from __future__ import annotations

import json
import time

import pytest
from server_helpers import Offline, make_adapter, metric, sse_events
from starlette.testclient import TestClient

import lorakit
from lorakit import generation, hf
from lorakit.loading.load import load_tokenizer
from lorakit.serve import metrics as M
from lorakit.serve import openai_api as api
from lorakit.serve.app import create_app
from lorakit.serve.engine import Engine
from lorakit.serve.params import ServeError
from lorakit.serve.registry import AdapterRegistry
from model_dirs import make_causal_lm_dir

BASE = "tiny"
PROMPT = "one two three"
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_app")
    model_dir = make_causal_lm_dir(root / "model")
    adapters = {name: make_adapter(model_dir, root / name, seed=i + 1) for i, name in enumerate("abc")}
    return model_dir, adapters


@pytest.fixture(scope="module")
def offline(dirs):
    model_dir, adapters = dirs
    return Offline(model_dir, adapters)


@pytest.fixture(scope="module")
def served(dirs):
    """(engine, registry, tokenizer) on a fresh copy of the model: adapters a and b registered, c not."""
    model_dir, adapters = dirs
    model, tokenizer = hf.load_model_dir(model_dir)
    registry = AdapterRegistry(model, BASE, max_loras=3, max_lora_rank=16)
    registry.register("a", adapters["a"])
    registry.register("b", adapters["b"])
    engine = Engine(model, tokenizer, registry, max_batch=8)
    engine.start()
    yield engine, registry, tokenizer
    engine.shutdown(drain=False, timeout=10)
    registry.close()


@pytest.fixture(scope="module")
def client(served):
    engine, registry, tokenizer = served
    with TestClient(create_app(engine, registry, tokenizer, max_n=4)) as test_client:
        yield test_client


def complete(client, **body):
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **body}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# -- routes ----------------------------------------------------------------------------------------------
def test_models_lists_the_base_and_each_adapter_with_the_base_as_parent(client):
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    assert [(m["id"], m["parent"]) for m in listing["data"]] == [(BASE, None), ("a", BASE), ("b", BASE)]
    assert all(m["object"] == "model" and m["owned_by"] == "lorakit" and isinstance(m["created"], int)
               for m in listing["data"])


@pytest.mark.parametrize("model", [BASE, "a", "b"])
def test_greedy_completion_equals_lorakit_generate(client, offline, model):
    reply = complete(client, model=model, max_tokens=8)
    assert reply["object"] == "text_completion" and reply["id"].startswith("cmpl-") and reply["model"] == model
    (choice,) = reply["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] in ("stop", "length")
    assert choice["text"] == offline.generate(None if model == BASE else model, PROMPT, 8)
    prompt_tokens = len(offline.tokenizer(PROMPT)["input_ids"])
    usage = reply["usage"]
    assert usage["prompt_tokens"] == prompt_tokens and 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]


def test_adapters_change_the_output(client):
    texts = {m: complete(client, model=m, max_tokens=8)["choices"][0]["text"] for m in (BASE, "a", "b")}
    assert len(set(texts.values())) == 3, texts


def test_chat_uses_the_template_and_equals_lorakit_generate_chat(client, offline):
    body = {"model": "a", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 6,
            "temperature": 0}
    reply = client.post("/v1/chat/completions", json=body).json()
    assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-") and reply["model"] == "a"
    (choice,) = reply["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == offline.generate("a", "hello world", 6, chat=True)
    template_ids = generation.build_prompt(offline.tokenizer, "hello world", chat=True)["input_ids"]
    assert reply["usage"]["prompt_tokens"] == template_ids.shape[-1]


def test_chat_content_parts_and_a_system_message(client):
    parts = [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]
    body = {"model": BASE, "max_tokens": 4, "temperature": 0}
    joined = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": parts}]})
    plain = client.post("/v1/chat/completions",
                        json={**body, "messages": [{"role": "user", "content": "hello world"}]})
    assert joined.json()["choices"] == plain.json()["choices"]
    system = client.post("/v1/chat/completions", json={**body, "messages": [
        {"role": "system", "content": "say yes"}, {"role": "user", "content": "hello world"}]}).json()
    assert system["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"]


def test_stream_completion_is_the_same_text_in_events_ending_with_done(client):
    whole = complete(client, model="a", max_tokens=8)
    body = {"model": "a", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] and c["model"] == "a" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == whole["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


def test_stream_chat_sends_role_then_content_then_finish_reason(client):
    body = {"model": "b", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 6, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        events = list(sse_events(response.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert "".join(d.get("content", "") for d in deltas[1:]) == whole["choices"][0]["message"]["content"]


def test_n_choices_with_a_seed_are_reproducible_and_seeded_one_by_one(client):
    body = {"model": "a", "max_tokens": 6, "temperature": 1.0, "seed": 7}
    three = complete(client, n=3, **body)
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert three == {**complete(client, n=3, **body), "id": three["id"], "created": three["created"]}
    singles = [complete(client, **{**body, "seed": 7 + i})["choices"][0]["text"] for i in range(3)]
    assert [c["text"] for c in three["choices"]] == singles
    assert len(set(singles)) > 1  # different seeds, different samples
    assert 3 <= three["usage"]["completion_tokens"] <= 18


def test_stream_with_n_indexes_each_choice(client):
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 5, "temperature": 1.0, "seed": 3, "n": 2}
    whole = client.post("/v1/completions", json=body).json()
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        chunks = [e for e in sse_events(response.iter_lines()) if e != "[DONE]"]
    texts = ["", ""]
    for chunk in chunks:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in whole["choices"]]


def test_stop_string_ends_the_text_before_it(client):
    full = complete(client, model="a", max_tokens=8)["choices"][0]["text"]
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    reply = complete(client, model="a", max_tokens=8, stop=[stop, "zzz"])
    assert reply["choices"][0]["text"] == full[:full.index(stop)]
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_a_mix_serves_the_weighted_combination(client, dirs, offline):
    reply = complete(client, model="a:0.5+b:0.5", max_tokens=8)
    assert reply["model"] == "a:0.5+b:0.5"
    model, tokenizer = hf.load_model_dir(dirs[0])
    for name in "ab":
        lorakit.load_adapter(model, dirs[1][name], name=name, trainable=False)
    lorakit.combine(model, {"a": 0.5, "b": 0.5}, name="mix")
    lorakit.set_active(model, ["mix"])
    assert reply["choices"][0]["text"] == generation.generate(model, tokenizer, PROMPT, max_new_tokens=8)


def test_load_and_unload_an_adapter(client, dirs, offline):
    path = str(dirs[1]["c"])
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": path})
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'c' added successfully."
    assert "c" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert complete(client, model="c", max_tokens=6)["choices"][0]["text"] == offline.generate("c", PROMPT, 6)
    response = client.post("/v1/unload_lora_adapter", json={"lora_name": "c"})
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'c' removed successfully."
    assert "c" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert_error(client.post("/v1/completions", json={"model": "c", "prompt": PROMPT}), 404, code="model_not_found")
    assert_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "c"}), 404)


def test_a_bad_adapter_file_is_a_400_with_the_reason_and_the_server_keeps_serving(client, dirs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps(json.loads((dirs[1]["a"] / "adapter_config.json").read_text())))
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    error = assert_error(client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(broken)}), 400)
    assert "safetensors" in error["message"] or "adapter_model" in error["message"], error
    error = assert_error(client.post("/v1/load_lora_adapter",
                                     json={"lora_name": "y", "lora_path": str(tmp_path / "missing")}), 400)
    assert "missing" in error["message"]
    assert "x" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert complete(client, model="a")["choices"][0]["text"]


def test_health_and_metrics(client):
    assert client.get("/health").status_code == 200
    before = client.get("/metrics").text
    complete(client, model="b", max_tokens=3)
    deadline = time.monotonic() + 10
    while True:  # the engine drops a finished row just after its last event: the gauges settle at once
        response = client.get("/metrics")
        text = response.text
        if metric(text, "lorakit_running") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert metric(text, "lorakit_requests_total", 'model="b"') == metric(before, "lorakit_requests_total", 'model="b"') + 1
    assert metric(text, "lorakit_generation_tokens_total") >= metric(before, "lorakit_generation_tokens_total") + 1
    assert metric(text, "lorakit_running") == 0 and metric(text, "lorakit_waiting") == 0
    assert metric(text, "lorakit_request_latency_seconds_count", 'phase="total"') >= 1
    assert metric(text, "lorakit_batch_size_count") >= 1 and metric(text, "lorakit_adapters_resident") >= 1
    for name in ("lorakit_adapter_cache_hits_total", "lorakit_adapter_loads_total", "lorakit_adapter_evictions_total",
                 "lorakit_prompt_tokens_total"):
        assert f"# TYPE {name} counter" in text


# -- every malformed request: a 4xx in OpenAI's shape ------------------------------------------------------
GOOD = {"model": BASE, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
CHAT = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_COMPLETIONS = [
    ("malformed-json", b'{"model": "tiny", "prompt": ', 400, None),
    ("empty-body", b"", 400, None),
    ("array-body", b"[1, 2]", 400, None),
    ("nan-literal", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, None),
    ("not-utf8", b'{"model": "\xff"}', 400, None),
    ("missing-model", {"prompt": PROMPT}, 400, "model"),
    ("model-not-a-string", {**GOOD, "model": 12}, 400, "model"),
    ("unknown-model", {**GOOD, "model": "nope"}, 404, "model"),
    ("unknown-mix-member", {**GOOD, "model": "a:0.5+nope:0.5"}, 404, "model"),
    ("malformed-mix", {**GOOD, "model": "a:x+b:0.5"}, 400, "model"),
    ("missing-prompt", {"model": BASE}, 400, "prompt"),
    ("prompt-a-number", {**GOOD, "prompt": 5}, 400, "prompt"),
    ("two-prompts", {**GOOD, "prompt": ["a", "b"]}, 400, "prompt"),
    ("token-ids", {**GOOD, "prompt": [1, 2, 3]}, 400, "prompt"),
    ("prompt-beyond-context", {**GOOD, "prompt": "one " * 300}, 400, "prompt"),
    ("max-tokens-beyond-context", {**GOOD, "max_tokens": 10**12}, 400, "max_tokens"),
    ("max-tokens-0", {**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-negative", {**GOOD, "max_tokens": -5}, 400, "max_tokens"),
    ("max-tokens-float", {**GOOD, "max_tokens": 2.5}, 400, "max_tokens"),
    ("max-tokens-string", {**GOOD, "max_tokens": "4"}, 400, "max_tokens"),
    ("max-tokens-bool", {**GOOD, "max_tokens": True}, 400, "max_tokens"),
    ("temperature-negative", {**GOOD, "temperature": -1}, 400, "temperature"),
    ("temperature-huge", {**GOOD, "temperature": 1e308}, 400, "temperature"),
    ("temperature-string", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    ("top-p-0", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("top-p-above-1", {**GOOD, "top_p": 1.5}, 400, "top_p"),
    ("n-0", {**GOOD, "n": 0}, 400, "n"),
    ("n-too-large", {**GOOD, "n": 5}, 400, "n"),
    ("n-string", {**GOOD, "n": "2"}, 400, "n"),
    ("stop-not-strings", {**GOOD, "stop": [1]}, 400, "stop"),
    ("stop-too-many", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("stop-empty", {**GOOD, "stop": ""}, 400, "stop"),
    ("seed-negative", {**GOOD, "seed": -1}, 400, "seed"),
    ("seed-huge", {**GOOD, "seed": 2**70}, 400, "seed"),
    ("stream-not-bool", {**GOOD, "stream": "yes"}, 400, "stream"),
    ("stream-options-without-stream", {**GOOD, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("echo", {**GOOD, "echo": True}, 400, "echo"),
    ("logprobs", {**GOOD, "logprobs": 2}, 400, "logprobs"),
    ("best-of", {**GOOD, "best_of": 3}, 400, "best_of"),
    ("suffix", {**GOOD, "suffix": "end"}, 400, "suffix"),
    ("presence-penalty", {**GOOD, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("unknown-field", {**GOOD, "frobnicate": 1}, 400, "frobnicate"),
    ("too-large", b'{"prompt": "' + b"x" * (9 * 2**20) + b'"}', 413, None),
]
BAD_CHATS = [
    ("messages-missing", {"model": BASE}, 400, "messages"),
    ("messages-empty", {**CHAT, "messages": []}, 400, "messages"),
    ("messages-not-objects", {**CHAT, "messages": ["hi"]}, 400, "messages"),
    ("unknown-role", {**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ("content-a-number", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("image-part", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages"),
    ("tools", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("logprobs", {**CHAT, "logprobs": True}, 400, "logprobs"),
    ("json-mode", {**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("both-max-tokens", {**CHAT, "max_completion_tokens": 3}, 400, "max_completion_tokens"),
    ("unknown-model", {**CHAT, "model": "nope"}, 404, "model"),
    ("max-tokens-beyond-context", {**CHAT, "max_tokens": 100000}, 400, "max_tokens"),
]
BAD_ADMIN = [
    ("load-missing-path", "/v1/load_lora_adapter", {"lora_name": "z"}, 400, "lora_path"),
    ("load-name-not-string", "/v1/load_lora_adapter", {"lora_name": 3, "lora_path": "/x"}, 400, "lora_name"),
    ("load-reserved-name", "/v1/load_lora_adapter", {"lora_name": "auto", "lora_path": "/x"}, 400, None),
    ("load-base-name", "/v1/load_lora_adapter", {"lora_name": BASE, "lora_path": "/x"}, 400, None),
    ("load-examples-not-strings", "/v1/load_lora_adapter", {"lora_name": "z", "lora_path": "/x", "examples": [1]},
     400, "examples"),
    ("unload-unknown", "/v1/unload_lora_adapter", {"lora_name": "never"}, 404, None),
    ("unload-malformed", "/v1/unload_lora_adapter", b"{", 400, None),
]


def _post(client, path: str, body):
    if isinstance(body, bytes):
        return client.post(path, content=body, headers={"content-type": "application/json"})
    return client.post(path, json=body)


@pytest.mark.parametrize("case, body, status, param", BAD_COMPLETIONS, ids=[c[0] for c in BAD_COMPLETIONS])
def test_a_bad_completion_request_is_a_4xx_in_openai_shape(client, case, body, status, param):
    assert_error(_post(client, "/v1/completions", body), status, param)


@pytest.mark.parametrize("case, body, status, param", BAD_CHATS, ids=[c[0] for c in BAD_CHATS])
def test_a_bad_chat_request_is_a_4xx_in_openai_shape(client, case, body, status, param):
    assert_error(_post(client, "/v1/chat/completions", body), status, param)


@pytest.mark.parametrize("case, path, body, status, param", BAD_ADMIN, ids=[c[0] for c in BAD_ADMIN])
def test_a_bad_adapter_request_is_a_4xx_in_openai_shape(client, case, path, body, status, param):
    assert_error(_post(client, path, body), status, param)


def test_unknown_routes_and_methods_are_4xx_in_openai_shape(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)
    assert_error(client.delete("/v1/models"), 405)


def test_after_bad_requests_the_server_still_answers_and_counts_them(client):
    before = metric(client.get("/metrics").text, "lorakit_request_errors_total", 'status="400"')
    assert_error(client.post("/v1/completions", json={**GOOD, "n": 0}), 400, "n")
    assert_error(client.post("/v1/completions", content=b"{"), 400)
    after = metric(client.get("/metrics").text, "lorakit_request_errors_total", 'status="400"')
    assert after == before + 2
    assert complete(client)["choices"][0]["text"]


def test_a_chat_needs_a_template(served, dirs):
    engine, registry, _ = served
    plain = load_tokenizer(dirs[0])
    plain.chat_template = None
    with TestClient(create_app(engine, registry, plain)) as test_client:
        error = assert_error(test_client.post("/v1/chat/completions", json=CHAT), 400, "messages")
    assert "chat template" in error["message"]


# -- the API key ----------------------------------------------------------------------------------------
def test_api_key_guards_every_route_but_health(served):
    engine, registry, tokenizer = served
    with TestClient(create_app(engine, registry, tokenizer, api_key="s3cret")) as keyed:
        assert keyed.get("/health").status_code == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                             ("POST", "/v1/chat/completions"), ("POST", "/v1/load_lora_adapter"),
                             ("POST", "/v1/unload_lora_adapter")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                            {"Authorization": "Basic s3cret"}):
                error = assert_error(keyed.request(method, path, headers=headers, json=GOOD), 401,
                                     code="invalid_api_key")
                assert "API key" in error["message"]
        good = {"Authorization": "Bearer s3cret"}
        assert keyed.get("/v1/models", headers=good).status_code == 200
        assert keyed.post("/v1/completions", headers=good, json=GOOD).status_code == 200


def test_create_app_refuses_bad_settings(served):
    engine, registry, tokenizer = served
    with pytest.raises(ValueError, match="max_n"):
        create_app(engine, registry, tokenizer, max_n=0)
    with pytest.raises(ValueError, match="api_key"):
        create_app(engine, registry, tokenizer, api_key="")


# -- pure parts ------------------------------------------------------------------------------------------
def test_parse_completion_defaults_and_aliases():
    request = api.parse_completion({"model": "m", "prompt": ["hi"], "stop": "x", "seed": 3}, max_n=2)
    assert request.prompt == "hi" and request.n == 1 and not request.stream
    assert request.params == lorakit.serve.SamplingParams(max_tokens=16, temperature=1.0, stop=("x",), seed=3)
    chat = api.parse_chat({"model": "m", "messages": [{"role": "user", "content": "q"}],
                           "max_completion_tokens": 5}, max_n=2)
    assert chat.params.max_tokens == 5 and chat.route_text == "q"
    with pytest.raises(ServeError, match="seed"):  # the last choice's seed is 2**63: beyond the range
        api.parse_completion({"model": "m", "prompt": "p", "seed": 2**63 - 1, "n": 2}, max_n=2)


def test_prometheus_text_counters_and_cumulative_histograms():
    counter = M.Counter("c_total", "a counter", labels=("model",))
    counter.inc(model='we"ird')
    counter.inc(2, model="b")
    histogram = M.Histogram("h", "a histogram", buckets=(1, 5))
    for value in (0.5, 1, 3, 9):
        histogram.observe(value)
    text = M.render([counter, histogram])
    assert 'c_total{model="we\\"ird"} 1\n' in text and 'c_total{model="b"} 2\n' in text
    assert '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="5"} 3\nh_bucket{le="+Inf"} 4\nh_sum 13.5\nh_count 4\n' in text
    counts, total = M.bucket_counts({1: 3, 2: 1, 100: 2}, (1, 4))
    assert counts == [3, 1, 2] and total == 205
    with pytest.raises(ValueError, match="decrease"):
        counter.inc(-1, model="b")
    with pytest.raises(ValueError, match="labels"):
        counter.inc(1)
    with pytest.raises(ValueError, match="increasing"):
        M.Histogram("bad", "x", buckets=(2, 1))


def test_auto_routes_to_the_nearest_description_and_says_which(client, dirs, offline):
    adapters = {"maths": ("c", "arithmetic: adding, counting and numbers", ["one plus two equals", "count to ten"]),
                "animals": ("b", "animals and their colours", ["the cat is red", "a big dog and a small bird"])}
    for name, (source, description, examples) in adapters.items():
        response = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(dirs[1][source]),
                                                               "description": description, "examples": examples})
        assert response.status_code == 200, response.text
    try:
        for prompt, chosen in (("three plus four equals", "maths"), ("the green fish and the yellow cat", "animals")):
            reply = complete(client, model="auto", prompt=prompt, max_tokens=5)
            assert reply["model"] == chosen
            assert reply["choices"][0]["text"] == offline.generate(adapters[chosen][0], prompt, 5)
    finally:
        for name in adapters:
            client.post("/v1/unload_lora_adapter", json={"lora_name": name})


def test_an_adapter_file_broken_after_registration_fails_its_request_not_the_server(client, dirs, tmp_path):
    """The file is read again when the adapter is paged in: if it broke meanwhile, that request ends with an
    error naming the adapter (a server-side failure: 500 server_error, in OpenAI's shape) and the server goes on."""
    import shutil

    copy = tmp_path / "fragile"
    shutil.copytree(dirs[1]["c"], copy)
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "fragile", "lora_path": str(copy)}).status_code == 200
    try:
        (copy / "adapter_model.safetensors").write_bytes(b"broken since registration")
        response = client.post("/v1/completions", json={**GOOD, "model": "fragile"})
        error = assert_error(response, 500)
        assert error["type"] == "server_error" and "fragile" in error["message"]
        with client.stream("POST", "/v1/completions", json={**GOOD, "model": "fragile", "stream": True}) as stream:
            events = list(sse_events(stream.iter_lines()))
        assert events[-1] == "[DONE]" and "fragile" in events[-2]["error"]["message"]
    finally:
        client.post("/v1/unload_lora_adapter", json={"lora_name": "fragile"})
    assert complete(client, model="a")["choices"][0]["text"]
