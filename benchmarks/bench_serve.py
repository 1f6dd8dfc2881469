"""Serving benchmark (issue 18): many adapters over one base model through lorakit's serving engine, against the
same engine with one adapter, a PEFT loop and merged models, on the CPU (fp32), in one child process per adapter
count with the contestants alternated round by round.

    .venv/bin/python benchmarks/bench_serve.py            # -> benchmarks/RESULTS-serve.md (and stdout)
    .venv/bin/python benchmarks/bench_serve.py --quick    # smoke run, small sizes

* model: ``models.build_base(hidden)`` (4-layer Llama-style, fp32, seed 0, vocabulary 2048) with a word-level
  tokenizer of 2048 words and no end-of-sequence token, so every request generates exactly max_tokens tokens;
  adapters: LoRA r = 8, alpha 16 on q_proj, k_proj, v_proj, o_proj with random non-zero A and B (seeded per adapter),
  saved with lorakit.save_adapter into a temporary directory.
* load: the same for every contestant and adapter count: `requests` requests, each `prompt` random token ids and
  max_tokens `tokens`, greedy; request i asks for adapter i mod N. All arrive at t = 0 (a burst).
* contestants (in-process; the HTTP layer is not measured):
  - ``lorakit:N``: lorakit.serve.Engine + AdapterRegistry (max_loras = N, all resident after warm-up), max_batch 64:
    continuous batching, one mixed-adapter batch per decode step;
  - ``lorakit-one``: the same engine and load, every request for one adapter ((a) of the issue);
  - ``peft-loop:N``: one PeftModel with the N adapters; per request ``set_adapter(name)`` + ``generate`` (batch 1), one
    request after another ((b));
  - ``merged:N``: per adapter, its weights merged into the base (lorakit.merge), its requests generated together in
    one batch, then unmerged; adapters one after another ((c)).
* throughput: generated tokens / wall time of the whole load; latency: per request, from t = 0 to its last token
  (p50, p99). Each round runs every contestant once (order alternated per round); the throughput ratios are taken
  per round and their median reported.

Goals (issue 18): lorakit with 64 adapters >= 0.8x lorakit with one adapter, and >= 3x the PEFT loop.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import child
import family_bench
import models

HERE = Path(__file__).resolve().parent
SCRIPT = Path(__file__).resolve()
RANK, ALPHA, TARGETS = 8, 16.0, ["q_proj", "k_proj", "v_proj", "o_proj"]
GOAL_VS_ONE, GOAL_VS_PEFT = 0.8, 3.0


@dataclass(frozen=True)
class Sizes:
    hidden: int = 256
    requests: int = 64
    prompt: int = 16
    tokens: int = 16
    adapter_counts: tuple[int, ...] = (1, 8, 64)
    rounds: int = 2
    max_batch: int = 64


FULL, QUICK = Sizes(), Sizes(hidden=128, requests=16, prompt=8, tokens=6, adapter_counts=(1, 4), rounds=1)


# -- child side ------------------------------------------------------------------------------------------------
def _tokenizer() -> Any:
    """A word-level fast tokenizer of models.VOCAB words ("w0" ...) with a pad token and no eos."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(models.VOCAB)}
    core = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="w1"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="w0", unk_token="w1")


def _base(hidden: int) -> Any:
    model = models.build_base(hidden)
    model.config.use_cache = True
    model.config.pad_token_id = 0
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def _save_adapters(hidden: int, count: int, root: Path) -> list[Path]:
    """`count` LoRA adapters with random non-zero factors (seed = index), saved under `root`."""
    import torch

    import lorakit

    dirs = []
    for i in range(count):
        model = _base(hidden)
        lorakit.attach(model, lorakit.LoraConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS))
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        dirs.append(root / f"a{i}")
        lorakit.save_adapter(model, dirs[-1])
    return dirs


def _load(count: int, requests: int, prompt: int) -> list[tuple[int, list[int]]]:
    """(adapter index, prompt ids) per request: request i asks for adapter i mod count."""
    import torch

    gen = torch.Generator().manual_seed(7)
    return [(i % count, torch.randint(2, models.VOCAB, (prompt,), generator=gen).tolist()) for i in range(requests)]


def _summary(start: float, ends: list[float], tokens: int) -> dict[str, Any]:
    wall = max(ends) - start
    lat = sorted(e - start for e in ends)
    p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "p50_s": statistics.median(lat), "p99_s": p99}


class LorakitServer:
    """The serving engine over the saved adapters (all registered; max_loras = their number)."""

    def __init__(self, hidden: int, dirs: list[Path], max_batch: int) -> None:
        from lorakit.serve import AdapterRegistry, Engine

        self.registry = AdapterRegistry(_base(hidden), "base", max_loras=max(1, len(dirs)), max_lora_rank=64)
        for i, d in enumerate(dirs):
            self.registry.register(f"a{i}", d)
        self.engine = Engine(self.registry.model, _tokenizer(), self.registry, max_batch=max_batch)
        self.engine.start()

    def run(self, load: list[tuple[int, list[int]]], tokens: int, one_adapter: bool = False) -> dict[str, Any]:
        from lorakit.serve import SamplingParams

        params = SamplingParams(max_tokens=tokens, temperature=0)
        start = time.perf_counter()
        handles = [self.engine.submit(ids, self.registry.resolve("a0" if one_adapter else f"a{a}"), params)
                   for a, ids in load]
        ends: dict[int, float] = {}
        while len(ends) < len(handles):  # each request's end seen within ~1 ms
            for i, handle in enumerate(handles):
                if i not in ends and handle.finished:
                    ends[i] = time.perf_counter()
            time.sleep(0.001)
        total = 0
        for handle in handles:
            result = handle.wait()
            if result.finish_reason != "length":
                raise RuntimeError(f"a request ended with {result.finish_reason}: {result.error}")
            total += result.completion_tokens
        return _summary(start, list(ends.values()), total)

    def close(self) -> None:
        self.engine.shutdown(drain=True)
        self.registry.close()


class PeftLoop:
    """One PeftModel with every adapter; set_adapter + generate per request, one after another."""

    def __init__(self, hidden: int, dirs: list[Path]) -> None:
        import peft

        self.model = peft.PeftModel.from_pretrained(_base(hidden), str(dirs[0]), adapter_name="a0")
        for i, d in enumerate(dirs[1:], start=1):
            self.model.load_adapter(str(d), adapter_name=f"a{i}")
        self.model.eval()

    def run(self, load: list[tuple[int, list[int]]], tokens: int) -> dict[str, Any]:
        import torch

        start, ends, total = time.perf_counter(), [], 0
        with torch.inference_mode():
            for a, ids in load:
                self.model.set_adapter(f"a{a}")
                out = self.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                          dtype=torch.long), max_new_tokens=tokens, min_new_tokens=tokens,
                                          do_sample=False, pad_token_id=0)
                total += out.shape[1] - len(ids)
                ends.append(time.perf_counter())
        return _summary(start, ends, total)


class MergedModels:
    """Per adapter: merge it into the base, generate its requests in one batch, unmerge; one adapter after another."""

    def __init__(self, hidden: int, dirs: list[Path]) -> None:
        import lorakit

        self.model = _base(hidden)
        for i, d in enumerate(dirs):
            lorakit.load_adapter(self.model, d, name=f"a{i}")

    def run(self, load: list[tuple[int, list[int]]], tokens: int) -> dict[str, Any]:
        import torch

        import lorakit

        start, ends, total = time.perf_counter(), [], 0
        groups: dict[int, list[list[int]]] = {}
        for a, ids in load:
            groups.setdefault(a, []).append(ids)
        with torch.inference_mode():
            for a, prompts in groups.items():
                name = f"a{a}"
                lorakit.merge(self.model, [name])
                batch = torch.tensor(prompts)  # equal prompt lengths: no padding
                out = self.model.generate(input_ids=batch, attention_mask=torch.ones_like(batch),
                                          max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                          pad_token_id=0)
                lorakit.unmerge(self.model)
                total += (out.shape[1] - batch.shape[1]) * batch.shape[0]
                now = time.perf_counter()
                ends.extend([now] * len(prompts))
        return _summary(start, ends, total)


def run_child(args: dict[str, Any]) -> dict[str, Any]:
    """One adapter count: build every contestant in this process, then `rounds` rounds of the whole load each,
    the contestants' order alternated per round. Per round and contestant: throughput and latency."""
    child._setup_torch(args["threads"])
    count, hidden, tokens = args["adapters"], args["hidden"], args["tokens"]
    load = _load(count, args["requests"], args["prompt"])
    with tempfile.TemporaryDirectory() as tmp:
        dirs = _save_adapters(hidden, count, Path(tmp))
        server = LorakitServer(hidden, dirs, args["max_batch"])
        runners = {f"lorakit:{count}": lambda: server.run(load, tokens),
                   "lorakit-one": lambda: server.run(load, tokens, one_adapter=True),
                   f"peft-loop:{count}": PeftLoop(hidden, dirs).run,
                   f"merged:{count}": MergedModels(hidden, dirs).run}
        for name, run in runners.items():  # warm-up: loads every adapter, first-touch of every buffer
            warm = load[: max(count, 2)]
            run() if name.startswith("lorakit") else run(warm, 2)  # type: ignore[operator]
        rounds: list[dict[str, Any]] = []
        names = list(runners)
        try:
            for rnd in range(args["rounds"]):
                order = names if rnd % 2 == 0 else names[::-1]
                results = {}
                for name in order:
                    run = runners[name]
                    results[name] = run() if name.startswith("lorakit") else run(load, tokens)  # type: ignore
                rounds.append(results)
        finally:
            server.close()
    return {"adapters": count, "rounds": rounds}


# -- orchestrator side ---------------------------------------------------------------------------------------
def bench(sizes: Sizes, threads: int) -> dict[str, Any]:
    runs = {}
    for count in sizes.adapter_counts:
        payload = {"kind": "serve", "threads": threads, "adapters": count, **{k: v for k, v in asdict(sizes).items()
                                                                             if k != "adapter_counts"}}
        runs[str(count)] = family_bench.spawn(SCRIPT, payload)
    return {"settings": {**asdict(sizes), "threads": threads}, "runs": runs}


def _median_ratio(rounds: list[dict[str, Any]], num: str, den: str) -> float:
    return statistics.median(r[num]["tok_s"] / r[den]["tok_s"] for r in rounds)


def report(result: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    s = result["settings"]
    lines = ["# Serving benchmark (lorakit serve's engine: many adapters in one batch)", "",
             f"- Machine: {meta['cpu']}, {meta['logical_cpus']} logical CPUs; torch threads {s['threads']}; fp32",
             f"- Versions: Python {meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}, "
             f"peft {meta['peft']}, lorakit {meta['lorakit_commit']}",
             f"- Date: {meta['date']}; total {meta['duration_s']} s; load average at start / end "
             f"{meta['load_avg_start']} / {meta['load_avg_end']}",
             f"- Model: 4-layer Llama-style, hidden {s['hidden']}, vocabulary {models.VOCAB}; adapters LoRA r={RANK} on "
             f"{', '.join(TARGETS)}; load: {s['requests']} requests at once, {s['prompt']} prompt tokens, "
             f"{s['tokens']} generated tokens each, greedy; request i -> adapter i mod N; {s['rounds']} round(s) per "
             "adapter count, contestants alternated; ratios: median over rounds of the per-round throughput ratio.",
             "",
             "| adapters | contestant | tokens/s | p50 latency s | p99 latency s | wall s |",
             "|---|---|---|---|---|---|"]
    goals = []
    for count, run in result["runs"].items():
        if not run.get("ok", True) or "rounds" not in run:
            lines.append(f"| {count} | error: {str(run.get('error', ''))[-300:]} | | | | |")
            continue
        rounds = run["rounds"]
        for name in rounds[0]:
            pick = [r[name] for r in rounds]
            lines.append(f"| {count} | {name} | {statistics.median(p['tok_s'] for p in pick):.0f} | "
                         f"{statistics.median(p['p50_s'] for p in pick):.2f} | "
                         f"{statistics.median(p['p99_s'] for p in pick):.2f} | "
                         f"{statistics.median(p['wall_s'] for p in pick):.2f} |")
        vs_one = _median_ratio(rounds, f"lorakit:{count}", "lorakit-one")
        vs_peft = _median_ratio(rounds, f"lorakit:{count}", f"peft-loop:{count}")
        vs_merged = _median_ratio(rounds, f"lorakit:{count}", f"merged:{count}")
        goals.append(f"| {count} | {vs_one:.2f}x | {vs_peft:.2f}x | {vs_merged:.2f}x |"
                     + (f" {'yes' if vs_one >= GOAL_VS_ONE and vs_peft >= GOAL_VS_PEFT else 'NO'} |"
                        if int(count) == max(int(c) for c in result["runs"]) else " - |"))
    lines += ["", "| adapters | lorakit:N / lorakit-one | lorakit:N / PEFT loop | lorakit:N / merged | "
              f"goals (largest N: >= {GOAL_VS_ONE}x one adapter, >= {GOAL_VS_PEFT}x PEFT loop) |",
              "|---|---|---|---|---|", *goals]
    return lines


if __name__ == "__main__":
    sys.exit(family_bench.main(__doc__, run_child, bench, report, (FULL, QUICK), HERE / "RESULTS-serve.md"))
