"""lorakit benchmark suite: FLOOR vs lorakit vs PEFT, on CPU, fp32, 2 threads.

Usage::

    .venv/bin/python benchmarks/run.py                 # full run -> benchmarks/RESULTS.md
    .venv/bin/python benchmarks/run.py --quick         # smoke run, smaller sizes, 1 round
    .venv/bin/python benchmarks/run.py --only train_step --out /tmp/r.md

Benchmarks (every configuration is measured in its own fresh subprocess, see child.py):

* ``train_step``      -- forward + loss + backward + zero_grad of a 4-layer Llama-style model
                         (batch 4 x 256) at hidden 512 and 1024, LoRA dropout 0 and 0.1: median step
                         time and peak-RSS growth of FLOOR (frozen model, activation grads only),
                         lorakit and PEFT, each in its own process; and the paired ratio to FLOOR
                         (FLOOR and the contestant alternated in one process), which the time goals use.
* ``inference``       -- unmerged forward, eval mode, inference_mode, batch 32 x 128, hidden 1024:
                         base model vs lorakit vs PEFT.
* ``merge_save_load`` -- merge_and_unload, adapter save and adapter load times at hidden 1024,
                         plus adapter size on disk: lorakit vs PEFT.
* ``train_loop``      -- lorakit's whole training loop, this checkout vs a base commit (``--base``,
                         default 5929d8b, before the Trainer refactor), paired ABBA (bench_loop.py).

Fairness: repetitions are organised in rounds; each round runs one child per contestant, and the
contestant order is rotated from round to round so that slow drifts in machine load hit everybody.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import child
import environment
import report

HERE = Path(__file__).resolve().parent
BENCHMARKS: tuple[str, ...] = (
    "train_step", "inference", "merge_save_load", "variants", "qlora", "swap", "mixed_batch", "loading",
    "train_loop",
)
# the variants benchmark: lorakit's LoRA, DoRA, LoRA-FA beside PEFT's LoRA and DoRA (training step, dropout 0)
VARIANT_CONTESTANTS: tuple[str, ...] = ("lorakit", "lorakit:dora", "lorakit:fa", "peft", "peft:dora")
INIT_METHODS: tuple[str, ...] = ("pissa_niter_4", "olora")  # timed on one init_size^2 matrix (exact SVD: slow)


@dataclass(frozen=True)
class Settings:
    """Sizes and repetition counts for one run."""

    rounds: int = 3
    warmup: int = 2
    threads: int = 2
    train_hiddens: tuple[int, ...] = (512, 1024)
    train_dropouts: tuple[float, ...] = (0.0, 0.1)
    train_batch: int = 4
    train_seq: int = 256
    train_steps: int = 6
    train_pairs: int = 6  # alternated FLOOR / contestant step pairs per paired child
    infer_hidden: int = 1024
    infer_batch: int = 32
    infer_seq: int = 128
    infer_steps: int = 4
    infer_pairs: int = 4  # alternated base / contestant forward pairs per paired child
    io_hidden: int = 1024
    io_rounds: int = 2
    io_reps: int = 3
    io_warmup: int = 1
    variants_hiddens: tuple[int, ...] = (1024, 2048)
    variants_rounds: int = 2
    variants_steps: int = 4
    init_size: int = 4096  # PiSSA / OLoRA initialisation of one init_size x init_size matrix
    init_reps: int = 2
    child_timeout_s: float = 900.0
    wait_quiet_s: float = 0.0
    loop_base: str = "5929d8b"  # train_loop: the commit the loop is compared with (before the Trainer refactor)
    quick: bool = False
    skip: tuple[str, ...] = field(default_factory=tuple)


FULL = Settings()
QUICK = Settings(
    rounds=1,
    train_hiddens=(512,),
    train_seq=128,
    train_steps=2,
    train_pairs=2,
    infer_hidden=512,
    infer_batch=8,
    infer_steps=2,
    infer_pairs=2,
    io_hidden=512,
    io_rounds=1,
    io_reps=1,
    variants_hiddens=(512,),
    variants_rounds=1,
    variants_steps=2,
    init_size=1024,
    init_reps=1,
    child_timeout_s=300.0,
    quick=True,
)


def run_child(payload: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its JSON result (or an error dict)."""
    env = dict(os.environ)
    threads = str(payload["threads"])
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
    )
    cmd = [sys.executable, str(HERE / "run.py"), "--child", json.dumps(payload)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"child timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(child.RESULT_MARKER):
            result: dict[str, Any] = json.loads(line[len(child.RESULT_MARKER) :])
            return result
    tail = (proc.stderr or proc.stdout)[-3000:]
    return {
        "ok": False,
        "error": f"child exited with code {proc.returncode} without a result",
        "traceback": tail,
    }


def wait_until_quiet(limit_s: float, threshold: float = 0.10) -> float:
    """Wait (at most ``limit_s``) until other processes use under ``threshold`` of the CPUs; returns the share."""
    import psutil

    deadline = time.monotonic() + limit_s
    while True:
        share = psutil.cpu_percent(interval=1.0) / 100.0  # this orchestrator is idle: all of it is others'
        if share < threshold or time.monotonic() >= deadline:
            if share >= threshold:
                _log(f"  machine still busy ({share:.0%} CPU) after waiting {limit_s:.0f} s; going on")
            return share
        time.sleep(4.0)


def rotated(items: list[Any], by: int) -> list[Any]:
    if not items:
        return items
    k = by % len(items)
    return items[k:] + items[:k]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _execute(
    jobs: list[tuple[str, dict[str, Any]]], settings: Settings, results: dict[str, list[Any]]
) -> None:
    for key, payload in jobs:
        if settings.wait_quiet_s > 0:
            wait_until_quiet(settings.wait_quiet_s)
        t0 = time.perf_counter()
        res = run_child(payload, settings.child_timeout_s)
        results.setdefault(key, []).append(res)
        status = "ok" if res.get("ok") else f"ERROR: {res.get('error')}"
        _log(f"  {key:<38} {time.perf_counter() - t0:6.1f} s  {status}")


def bench_train(s: Settings) -> dict[str, Any]:
    contestants = [c for c in ("floor", "lorakit", "peft") if c not in s.skip]
    results: dict[str, list[Any]] = {}
    base = {"kind": "train", "threads": s.threads, "batch": s.train_batch, "seq": s.train_seq}
    base.update(warmup=s.warmup, steps=s.train_steps)
    for rnd in range(s.rounds):
        _log(f"[train_step] round {rnd + 1}/{s.rounds}")
        for hidden in s.train_hiddens:
            jobs: list[tuple[str, dict[str, Any]]] = []
            # FLOOR has no dropout: measured once per hidden size and round, shared by both dropouts.
            if "floor" in contestants:
                jobs.append(
                    (f"H{hidden}/floor", {**base, "contestant": "floor", "hidden": hidden, "dropout": 0.0})
                )
            for p in s.train_dropouts:
                for c in contestants:
                    if c != "floor":
                        payload = {**base, "contestant": c, "hidden": hidden, "dropout": p}
                        jobs.append((f"H{hidden}/p{p}/{c}", payload))
                        if "floor" in contestants:  # the same step alternated with FLOOR's in one process
                            paired = {**payload, "kind": "train_paired", "pairs": s.train_pairs}
                            jobs.append((f"H{hidden}/p{p}/{c}/paired", paired))
            _execute(rotated(jobs, rnd), s, results)
    return {"settings": asdict(s), "results": results}


def bench_infer(s: Settings) -> dict[str, Any]:
    contestants = [c for c in ("base", "lorakit", "peft") if c not in s.skip]
    results: dict[str, list[Any]] = {}
    base = {"kind": "infer", "threads": s.threads, "hidden": s.infer_hidden, "batch": s.infer_batch}
    base.update(seq=s.infer_seq, warmup=s.warmup, steps=s.infer_steps)
    for rnd in range(s.rounds):
        _log(f"[inference] round {rnd + 1}/{s.rounds}")
        jobs = [(c, {**base, "contestant": c}) for c in contestants]
        if "base" in contestants:  # each adapter model alternated with the base model in one process
            jobs += [(f"{c}/paired", {**base, "kind": "infer_paired", "contestant": c, "pairs": s.infer_pairs})
                     for c in contestants if c != "base"]
        _execute(rotated(jobs, rnd), s, results)
    return {"settings": asdict(s), "results": results}


def bench_io(s: Settings) -> dict[str, Any]:
    contestants = [c for c in ("lorakit", "peft") if c not in s.skip]
    results: dict[str, list[Any]] = {}
    base = {
        "kind": "io",
        "threads": s.threads,
        "hidden": s.io_hidden,
        "reps": s.io_reps,
        "warmup": s.io_warmup,
    }
    for rnd in range(s.io_rounds):
        _log(f"[merge_save_load] round {rnd + 1}/{s.io_rounds}")
        jobs = [(c, {**base, "contestant": c}) for c in contestants]
        _execute(rotated(jobs, rnd), s, results)
    return {"settings": asdict(s), "results": results}


def bench_variants(s: Settings) -> dict[str, Any]:
    contestants = [c for c in VARIANT_CONTESTANTS if c.partition(":")[0] not in s.skip]
    results: dict[str, list[Any]] = {}
    base = {"kind": "train", "threads": s.threads, "batch": s.train_batch, "seq": s.train_seq, "dropout": 0.0}
    base.update(warmup=s.warmup, steps=s.variants_steps)
    for rnd in range(s.variants_rounds):
        _log(f"[variants] round {rnd + 1}/{s.variants_rounds}")
        for hidden in s.variants_hiddens:
            jobs = [(f"H{hidden}/{c}", {**base, "contestant": c, "hidden": hidden}) for c in contestants]
            _execute(rotated(jobs, rnd), s, results)
        infer = {"kind": "infer", "threads": s.threads, "hidden": s.infer_hidden, "batch": s.infer_batch}
        infer.update(seq=s.infer_seq, warmup=s.warmup, steps=s.infer_steps)
        jobs = [(f"infer/{c}", {**infer, "contestant": c}) for c in ("lorakit", "lorakit:dora", "peft:dora")]
        # the goal's ratio, paired: lorakit's LoRA and DoRA in one process, forwards alternated
        jobs.append(("infer/lorakit:dora/paired", {**infer, "kind": "infer_paired", "contestant": "lorakit:dora",
                                                   "reference": "lorakit", "pairs": s.infer_pairs}))
        init = {"kind": "init", "threads": s.threads, "size": s.init_size, "reps": s.init_reps}
        for method in INIT_METHODS:
            jobs += [(f"init/{method}/{c}", {**init, "contestant": c, "init": method}) for c in ("lorakit", "peft")]
        _execute(rotated([j for j in jobs if j[1]["contestant"].partition(":")[0] not in s.skip], rnd), s, results)
    return {"settings": asdict(s), "results": results}


def _module_runner(name: str) -> Any:
    """A runner for a benchmark that lives in its own module (benchmarks/bench_*.py: KINDS, bench, section)."""

    def run(s: Settings) -> dict[str, Any]:
        return child.extra_module(name).bench(s, _execute)

    return run


RUNNERS = {
    "train_step": bench_train,
    "inference": bench_infer,
    "merge_save_load": bench_io,
    "variants": bench_variants,
    **{name: _module_runner(name) for name in child.EXTRA_MODULES},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fast smoke run: smaller sizes, 1 round")
    ap.add_argument(
        "--only", choices=BENCHMARKS, action="append", help="run only this benchmark (repeatable)"
    )
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="markdown report path")
    ap.add_argument("--json", type=Path, default=None, help="raw results (default: <out>.json)")
    ap.add_argument("--rounds", type=int, default=None, help="override the number of rounds")
    ap.add_argument("--steps", type=int, default=None, help="override timed steps per child")
    ap.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("lorakit", "peft", "floor", "base"),
        help="leave out a contestant (repeatable), e.g. while lorakit does not exist yet",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each child, wait up to S seconds until other processes use < 10%% of the CPUs",
    )
    ap.add_argument("--base", default=None, metavar="REV",
                    help="train_loop: the commit whose training loop this checkout is paired with (default 5929d8b)")
    ap.add_argument("--render", type=Path, default=None, metavar="JSON",
                    help="write the report of the raw results in JSON (a run's .json) to --out; runs nothing")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {"skip": tuple(args.skip), "wait_quiet_s": args.wait_quiet}
    if args.base is not None:
        overrides["loop_base"] = args.base
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
        overrides["io_rounds"] = args.rounds
        overrides["variants_rounds"] = args.rounds
    if args.steps is not None:
        overrides.update(train_steps=args.steps, train_pairs=args.steps, infer_steps=args.steps,
                         infer_pairs=args.steps, variants_steps=args.steps)
    return Settings(**{**asdict(s), **overrides})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child.main(args.child)
    if args.render is not None:  # the same measurements, the report re-made (e.g. after its text changed)
        raw = json.loads(args.render.read_text())
        args.out.write_text(report.render(raw["meta"], raw["benchmarks"]))
        _log(f"wrote {args.out} from {args.render}")
        return 0
    settings = make_settings(args)
    names = args.only or list(BENCHMARKS)
    started = time.time()
    load_start = os.getloadavg()
    data: dict[str, Any] = {}
    for name in names:
        data[name] = RUNNERS[name](settings)
    elapsed = time.time() - started
    meta = environment.collect_meta(settings.threads, elapsed, settings.quick, load_start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path = args.json or args.out.with_suffix(".json")
    json_path.write_text(json.dumps({"meta": meta, "benchmarks": data}, indent=1))  # first: a report bug loses nothing
    markdown = report.render(meta, data)
    args.out.write_text(markdown)
    print(markdown)
    _log(f"wrote {args.out} and {json_path} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
