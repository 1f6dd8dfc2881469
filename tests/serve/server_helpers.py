"""Helpers of the HTTP server's tests (test_app, test_server_process, test_load): tiny adapters with random
non-zero factors, offline reference generations (what `lorakit generate` gives), and the real `lorakit serve`
process on a free port of 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

import lorakit
from lorakit import generation, hf
from model_dirs import save_random_adapter

TARGET_SETS = (["q_proj", "v_proj"], ["k_proj", "o_proj"], ["up_proj", "down_proj"], ["q_proj", "gate_proj"])


def make_adapter(model_dir: Path, out: Path, seed: int, r: int = 4, std: float = 0.5) -> Path:
    """A LoRA adapter for the model in `model_dir` whose B factors are random (not zero), saved to `out`;
    the targeted modules depend on the seed, so different adapters change different layers."""
    targets = TARGET_SETS[seed % len(TARGET_SETS)]
    config = lorakit.LoraConfig(r=r, alpha=2 * r, target_modules=targets, dropout=0.0)
    return save_random_adapter(model_dir, out, config, std, seed)


class Offline:
    """Reference generations on one loaded copy of the model: greedy `lorakit.generation.generate` with one
    adapter active (or none), as `lorakit generate --adapter DIR` does."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path]) -> None:
        self.model, self.tokenizer = hf.load_model_dir(model_dir)
        for name, path in adapters.items():
            lorakit.load_adapter(self.model, path, name=name, trainable=False)
        self.cache: dict[tuple[str | None, str, int, bool], str] = {}

    def generate(self, adapter: str | None, prompt: str, max_tokens: int, chat: bool = False) -> str:
        key = (adapter, prompt, max_tokens, chat)
        if key not in self.cache:
            if adapter is None:
                with lorakit.disabled(self.model):
                    text = generation.generate(self.model, self.tokenizer, prompt, max_new_tokens=max_tokens, chat=chat)
            else:
                lorakit.set_active(self.model, [adapter])
                text = generation.generate(self.model, self.tokenizer, prompt, max_new_tokens=max_tokens, chat=chat)
            self.cache[key] = text
        return self.cache[key]


def sse_events(lines: Iterator[str]) -> Iterator[dict | str]:
    """The data of each server-sent event: parsed JSON, or the string "[DONE]"."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample of Prometheus text (0 when absent), e.g. metric(t, "lorakit_running")."""
    pattern = "^" + re.escape(name + (f"{{{labels}}}" if labels else "")) + r" (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


class ServerProcess:
    """`python -m lorakit serve ...` on 127.0.0.1, port 0 (the system picks a free one; the server prints it)."""

    def __init__(self, args: Sequence[str], api_key: str | None = None, start_timeout: float = 120.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        env.pop("LORAKIT_API_KEY", None)
        command = [sys.executable, "-m", "lorakit", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        if api_key is not None:
            command += ["--api-key", api_key]
        self.api_key = api_key
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.stderr: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.url = self._read_url(start_timeout)
        self.base_url = self.url.removesuffix("/v1")
        self._wait_healthy(start_timeout)

    def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)

    def _read_url(self, timeout: float) -> str:
        """The URL from the server's first line of standard output."""
        assert self.process.stdout is not None
        found: list[str] = []

        def read() -> None:
            assert self.process.stdout is not None
            line = self.process.stdout.readline()
            match = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line)
            if match:
                found.append(match.group(1))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        if not found:
            self.kill()
            raise RuntimeError(f"the server did not start: {''.join(self.stderr)[-3000:]}")
        return found[0]

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"/health never answered: {''.join(self.stderr)[-3000:]}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def metrics(self) -> str:
        response = httpx.get(f"{self.base_url}/metrics", headers=self.headers, timeout=10)
        response.raise_for_status()
        return response.text

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit status (killed after `timeout` seconds)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@contextmanager
def running_server(args: Sequence[str], api_key: str | None = None) -> Iterator[ServerProcess]:
    server = ServerProcess(args, api_key=api_key)
    try:
        yield server
    finally:
        server.kill()
