"""A bounded load test of the real `lorakit serve` process on 127.0.0.1: 200 greedy requests from 16 concurrent
clients across 8 adapters and the base (at most 4 adapters resident, so adapters are paged in and out while
requests run), through the `openai` client and as plain-HTTP streams. Every request must succeed with the text
`lorakit generate` gives offline for its prompt and adapter, whatever else shared its batches."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from server_helpers import Offline, make_adapter, metric, running_server, sse_events

from model_dirs import make_causal_lm_dir

REQUESTS = 200
CLIENTS = 16
ADAPTERS = [f"a{i}" for i in range(8)]
BASE = "tiny"
PROMPTS = ["one two three", "the cat is", "what is the answer", "red green blue"]
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_load")
    model_dir = make_causal_lm_dir(root / "model")
    adapters = {name: make_adapter(model_dir, root / name, seed=i + 1, r=2 + i % 3)
                for i, name in enumerate(ADAPTERS)}
    return model_dir, adapters


def plan(i: int) -> tuple[str, str, bool]:
    """Request i: (model, prompt, stream over plain HTTP?)."""
    models = [BASE, *ADAPTERS]
    return models[i % len(models)], PROMPTS[(i // len(models)) % len(PROMPTS)], i % 4 == 3


def test_200_requests_from_16_clients_across_8_adapters(setup):
    model_dir, adapters = setup
    offline = Offline(model_dir, adapters)
    expected = {(m, p): offline.generate(None if m == BASE else m, p, MAX_TOKENS)
                for m in [BASE, *ADAPTERS] for p in PROMPTS}
    args = ["--model", str(model_dir), "--served-model-name", BASE, "--max-loras", "4", "--max-batch", "32"]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    with running_server(args) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        http = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=CLIENTS))

        def one(i: int) -> tuple[int, str, str]:
            model, prompt, stream = plan(i)
            body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            if not stream:
                reply = client.completions.create(**body)
                assert reply.model == model
                return i, reply.choices[0].text, reply.choices[0].finish_reason
            with http.stream("POST", f"{server.url}/completions", json={**body, "stream": True}) as response:
                assert response.status_code == 200, response.read()
                events = list(sse_events(response.iter_lines()))
            assert events[-1] == "[DONE]"
            return i, "".join(e["choices"][0]["text"] for e in events[:-1]), events[-2]["choices"][0]["finish_reason"]

        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(one, range(REQUESTS)))
        http.close()
        deadline = time.monotonic() + 10
        while metric(text := server.metrics(), "lorakit_running") and time.monotonic() < deadline:
            time.sleep(0.01)  # the engine drops a finished row just after its last event
    wrong = [(plan(i)[:2], got, expected[plan(i)[:2]]) for i, got, _ in results if got != expected[plan(i)[:2]]]
    assert not wrong, f"{len(wrong)} of {REQUESTS} outputs differ from the offline ones, e.g. {wrong[:3]}"
    assert all(reason in ("stop", "length") for _, _, reason in results)
    assert sum(metric(text, "lorakit_requests_total", f'model="{m}"') for m in [BASE, *ADAPTERS]) == REQUESTS
    assert metric(text, "lorakit_request_errors_total", 'status="500"') == 0
    assert metric(text, "lorakit_adapter_evictions_total") > 0  # 8 adapters through 4 slots: paged
    assert metric(text, "lorakit_batch_size_sum") > metric(text, "lorakit_batch_size_count")  # batches of > 1
    assert metric(text, "lorakit_running") == 0 and metric(text, "lorakit_waiting") == 0
