"""The `train_loop` benchmark: lorakit's whole training loop (`lorakit.train.loop.train`) of a base commit and of
this checkout, paired in the same run: the two alternate in fresh processes (ABBA) on a small Llama, where the
loop's own overhead (logging, callbacks, checkpoints, diagnostics) is a large share of each step.

    .venv/bin/python benchmarks/run.py --only train_loop [--base REV]   # part of the suite (RESULTS.md)
    .venv/bin/python benchmarks/bench_loop.py --base 5929d8b --pairs 8   # alone, markdown on stdout

The default base, 5929d8b, is the last commit before the loop became `lorakit.train.Trainer` with callbacks
(issue 14): the benchmark answers "is the training step still as fast as before the refactor". The base's source
is checked out with `git worktree` into a temporary directory and put first on PYTHONPATH of its runs; each run
reports `TrainResult.seconds` (the optimizer steps only, not loading) and its last loss (same data, seed and
settings on both sides, so the losses must be identical).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_BASE = "5929d8b"
GRANDCHILD = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[5]))
sys.path.insert(0, sys.argv[3])
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train
root, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = TrainConfig(model=str(root / "model"), data=str(root / "train.jsonl"), out=str(out), max_steps=int(sys.argv[4]),
                  per_device_train_batch_size=8, logging_steps=10, diagnostics_steps=50, progress=False, seed=1,
                  lora_dropout=0.1)
result = train(cfg)
print("RESULT " + json.dumps({"seconds": result.seconds, "last_loss": result.losses[-1],
                              "file": __import__("lorakit").__file__}))
"""


@dataclass(frozen=True)
class Sizes:
    pairs: int = 8
    steps: int = 150
    hidden: int = 128
    layers: int = 2


FULL, QUICK = Sizes(), Sizes(pairs=2, steps=30)


def prepare(root: Path, sizes: Sizes) -> None:
    """The tiny model directory and the arithmetic prompt/completion data both sides train on."""
    sys.path.insert(0, str(REPO / "tests"))
    from model_dirs import make_causal_lm_dir

    make_causal_lm_dir(root / "model", hidden=sizes.hidden, layers=sizes.layers)
    records = [{"prompt": f"what is {a} plus {b} ?", "completion": f" {(a + b) % 10}"}
               for a in range(10) for b in range(10)]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def run_loop(args: dict[str, Any]) -> dict[str, Any]:
    """Child kind `train_loop`: one training run with the lorakit source at args['src'] (a fresh interpreter, so
    that source, and no other lorakit, is imported)."""
    env = dict(os.environ, PYTHONPATH=args["src"], LORAKIT_DATA_CACHE="0")
    done = subprocess.run([sys.executable, "-c", GRANDCHILD, args["root"], args["out"], str(REPO / "tests"),
                           str(args["steps"]), str(args["threads"])], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training run failed ({done.returncode}): {done.stderr[-2000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line[len("RESULT "):])
    if not Path(result["file"]).is_relative_to(Path(args["src"])):
        raise RuntimeError(f"imported {result['file']}, expected the source under {args['src']}")
    return result


KINDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"train_loop": run_loop}


def bench(s: Any, execute: Callable[..., None]) -> dict[str, Any]:
    """Check out the base commit, then run base and new `pairs` times each, the order alternating (ABBA)."""
    sizes = QUICK if s.quick else Sizes(pairs=getattr(s, "loop_pairs", FULL.pairs))
    base_rev = getattr(s, "loop_base", None) or DEFAULT_BASE
    results: dict[str, list[Any]] = {}
    head = _git("rev-parse", "--short", "HEAD")
    with tempfile.TemporaryDirectory(prefix="lorakit-loop-") as tmp:
        root = Path(tmp)
        worktree = root / "base"
        _git("worktree", "add", "--detach", "-q", str(worktree), base_rev)
        try:
            prepare(root, sizes)
            sides = {"base": str(worktree / "src"), "new": str(REPO / "src")}
            for i in range(sizes.pairs):
                order = ("base", "new") if i % 2 == 0 else ("new", "base")
                execute([(side, {"kind": "train_loop", "threads": s.threads, "src": sides[side], "root": tmp,
                                 "out": str(root / f"run-{i}-{side}"), "steps": sizes.steps}) for side in order],
                        s, results)
        finally:
            _git("worktree", "remove", "--force", str(worktree), check=False)
    return {"settings": {**asdict(sizes), "threads": s.threads, "warmup": 0, "base": base_rev, "head": head},
            "results": results}


def section(bench_dict: dict[str, Any], notes: list[str] | None = None) -> list[str]:
    """The markdown lines of the train_loop section."""
    st, res = bench_dict["settings"], bench_dict["results"]
    pairs = [(b, n) for b, n in zip(res.get("base", []), res.get("new", [])) if b.get("ok") and n.get("ok")]
    lines = [
        f"## train_loop ({st['head']} vs {st['base']})",
        "",
        f"`lorakit.train.loop.train` of this checkout (new) and of commit {st['base']} (base), alternated ABBA in "
        f"fresh processes: small Llama (hidden {st['hidden']}, {st['layers']} layers), {st['steps']} optimizer "
        f"steps, batch 8, LoRA dropout 0.1, logging every 10 and diagnostics every 50 steps, {st['threads']} "
        "threads; seconds of the optimizer steps only (`TrainResult.seconds`).",
        "",
        "| pair | base s | new s | new / base | same last loss |",
        "|---|---|---|---|---|",
    ]
    ratios = []
    for i, (b, n) in enumerate(pairs):
        ratios.append(n["seconds"] / b["seconds"])
        lines.append(f"| {i + 1} | {b['seconds']:.2f} | {n['seconds']:.2f} | {ratios[-1]:.3f} | "
                     f"{n['last_loss'] == b['last_loss']} |")
    if ratios:
        same = all(n["last_loss"] == b["last_loss"] for b, n in pairs)
        lines += ["", f"Median new / base: **{statistics.median(ratios):.3f}** (min {min(ratios):.3f}, "
                  f"max {max(ratios):.3f}); last losses identical in every pair: {same}."]
        if not same and notes is not None:
            notes.append("train_loop: the base and new loops reached different losses")
    elif notes is not None:
        notes.append("train_loop: no successful pair")
    return lines


def _git(*args: str, check: bool = True) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=check)
    return done.stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=DEFAULT_BASE, help="the commit to compare against")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    def execute(jobs: list[tuple[str, dict[str, Any]]], _s: Any, results: dict[str, list[Any]]) -> None:
        for key, payload in jobs:
            try:
                results.setdefault(key, []).append({**run_loop(payload), "ok": True})
            except RuntimeError as err:
                results.setdefault(key, []).append({"ok": False, "error": str(err)})

    settings = argparse.Namespace(quick=False, loop_base=args.base, loop_pairs=args.pairs, threads=args.threads)
    print("\n".join(section(bench(settings, execute))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
