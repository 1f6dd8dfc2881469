"""`lorakit serve` as a real process on 127.0.0.1 (a free port), driven by the real `openai` client and plain HTTP
(httpx): completions, chat and streams equal to `lorakit generate` offline, models, loading and unloading, the API
key, a client that disconnects mid-stream (its slot freed), SIGTERM while a stream runs (the stream completes, the
process exits 0), and the command's own mistakes (one error line, exit status 2 or 1)."""

from __future__ import annotations

import json
import signal
import socket
import time

import httpx
import openai
import pytest
from server_helpers import make_adapter, metric, running_server, sse_events

from lorakit.cli.main import main
from model_dirs import make_causal_lm_dir

KEY = "test-key"
BASE = "tiny"
PROMPT = "one two three"
LONG = 200  # greedy from PROMPT on the base model runs this long without an end-of-sequence token


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_process")
    model_dir = make_causal_lm_dir(root / "model")
    return model_dir, {name: make_adapter(model_dir, root / name, seed=i + 1) for i, name in enumerate("ab")}


def server_args(dirs) -> list[str]:
    model_dir, adapters = dirs
    args = ["--model", str(model_dir), "--served-model-name", BASE, "--max-loras", "2"]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    return args


@pytest.fixture(scope="module")
def server(dirs):
    with running_server(server_args(dirs), api_key=KEY) as process:
        yield process


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def lorakit_generate(capsys, dirs, adapter: str | None, prompt: str, max_tokens: int, chat: bool = False) -> str:
    """What `lorakit generate` prints for this prompt (the trailing newline removed)."""
    model_dir, adapters = dirs
    argv = ["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", str(max_tokens)]
    if adapter is not None:
        argv += ["--adapter", str(adapters[adapter])]
    if chat:
        argv.append("--chat")
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out.removesuffix("\n")


def test_models_through_the_openai_client(client):
    assert [m.id for m in client.models.list().data] == [BASE, "a", "b"]


@pytest.mark.parametrize("model", [BASE, "a"])
def test_completion_equals_lorakit_generate(client, capsys, dirs, model):
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    assert reply.model == model and reply.object == "text_completion"
    assert reply.choices[0].text == lorakit_generate(capsys, dirs, None if model == BASE else model, PROMPT, 8)
    assert reply.usage.completion_tokens == 8 or reply.choices[0].finish_reason == "stop"


def test_chat_equals_lorakit_generate_chat(client, capsys, dirs):
    reply = client.chat.completions.create(model="b", messages=[{"role": "user", "content": "hello world"}],
                                           max_tokens=6, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == lorakit_generate(capsys, dirs, "b", "hello world", 6, chat=True)


def test_streams_through_the_openai_client(client):
    whole = client.completions.create(model="a", prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(client.completions.create(model="a", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    messages = [{"role": "user", "content": "the cat"}]
    chat = client.chat.completions.create(model="b", messages=messages, max_tokens=6, temperature=0)
    pieces = list(client.chat.completions.create(model="b", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == chat.choices[0].message.content
    assert pieces[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_errors_reach_the_openai_client_in_its_shape(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt=PROMPT)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=BASE, prompt=PROMPT, max_tokens=0)
    assert bad.value.param == "max_tokens"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


def test_load_and_unload_over_http(server, client, dirs):
    url, path = server.base_url, str(dirs[1]["a"])
    assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": path}).status_code == 401
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": path},
                        headers=server.headers)
    assert loaded.status_code == 200, loaded.text
    same = [client.completions.create(model=m, prompt=PROMPT, max_tokens=5, temperature=0).choices[0].text
            for m in ("a", "c")]
    assert same[0] == same[1]  # the same file under another name
    unloaded = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "c"}, headers=server.headers)
    assert unloaded.status_code == 200
    assert [m.id for m in client.models.list().data] == [BASE, "a", "b"]
    assert httpx.get(f"{url}/health").status_code == 200  # no key needed


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client):
    whole = client.completions.create(model=BASE, prompt=PROMPT, max_tokens=LONG, temperature=0)
    assert whole.choices[0].finish_reason == "length", "the test needs a prompt that runs to max_tokens"
    before = server.metrics()
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/completions", json=body, headers=server.headers, timeout=60) as stream:
        first = next(sse_events(stream.iter_lines()))
        assert first["choices"][0]["text"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = server.metrics()
        if metric(after, "lorakit_running") == 0 and metric(after, "lorakit_sequences_cancelled_total") > 0:
            break
        time.sleep(0.05)
    assert metric(after, "lorakit_running") == 0 and metric(after, "lorakit_waiting") == 0
    assert metric(after, "lorakit_sequences_cancelled_total") == metric(before, "lorakit_sequences_cancelled_total") + 1
    generated = metric(after, "lorakit_generation_tokens_total") - metric(before, "lorakit_generation_tokens_total")
    assert generated < LONG  # stopped early, not run to the end


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_a_client_that_leaves_before_a_whole_response_frees_its_slot(server):
    """Not streamed: the server notices the closed connection while the sequence runs and cancels it."""
    before = server.metrics()
    body = json.dumps({"model": BASE, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0}).encode()
    port = int(server.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while metric(server.metrics(), "lorakit_running") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = server.metrics()
        if metric(after, "lorakit_running") == 0:
            break
        time.sleep(0.05)
    assert metric(after, "lorakit_sequences_cancelled_total") == metric(before, "lorakit_sequences_cancelled_total") + 1
    assert metric(after, "lorakit_generation_tokens_total") - metric(before, "lorakit_generation_tokens_total") < LONG


def test_sigterm_lets_a_running_stream_finish_then_exits_0(dirs):
    with running_server(server_args(dirs)) as server:
        body = {"model": BASE, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0}
        expected = httpx.post(f"{server.url}/completions", json=body, timeout=60).json()["choices"][0]["text"]
        body["stream"] = True
        with httpx.stream("POST", f"{server.url}/completions", json=body, timeout=60) as stream:
            events = sse_events(stream.iter_lines())
            received = [next(events)]
            server.process.send_signal(signal.SIGTERM)
            port = int(server.base_url.rsplit(":", 1)[1])
            deadline = time.monotonic() + 30
            while not refused(port) and time.monotonic() < deadline:  # shutting down: no new connections
                time.sleep(0.01)
            assert refused(port)
            received += list(events)  # ... while the running stream goes on to its end
        assert received[-1] == "[DONE]"
        assert "".join(e["choices"][0]["text"] for e in received[:-1]) == expected
        assert received[-2]["choices"][0]["finish_reason"] == "length"
        assert server.process.wait(60) == 0, "".join(server.stderr)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.base_url}/health", timeout=5)


# -- the command's own mistakes ----------------------------------------------------------------------------
def _run(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as done:
        code = done.code
    return code, capsys.readouterr().err


def test_a_bad_adapter_at_start_is_one_error_line(capsys, dirs, tmp_path):
    model_dir = str(dirs[0])
    code, err = _run(capsys, ["serve", "--model", model_dir, "--port", "0", "--adapter", f"x={tmp_path / 'nope'}"])
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and "--adapter x=" in lines[0] and "nope" in lines[0], err
    code, err = _run(capsys, ["serve", "--model", model_dir, "--adapter", "no-equals-sign"])
    assert code == 2 and "NAME=DIR" in err
    code, err = _run(capsys, ["serve", "--model", model_dir, "--port", "70000"])
    assert code == 2 and "--port" in err


def test_a_port_in_use_is_exit_status_1(capsys, dirs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = _run(capsys, ["serve", "--model", str(dirs[0]), "--port", str(port)])
    assert code == 1 and "in use" in err.lower() and f"127.0.0.1:{port}" in err, err


def test_the_server_binds_127_0_0_1_by_default():
    from lorakit.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--model", "m"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.api_key is None

