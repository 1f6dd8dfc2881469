"""The training loop before and after a change, paired: `lorakit.train.loop.train()` of a base commit and of this
checkout, alternated in fresh processes on a small Llama (the loop's own overhead is a large share of each step).

    .venv/bin/python benchmarks/bench_loop_refactor.py --base 5929d8b --pairs 8 --out /tmp/loop.md

Each child trains the same run (same data, seed and settings) and reports `TrainResult.seconds` (the optimizer
steps only, not loading) and the last loss; the base commit's source is checked out with `git worktree` into a
temporary directory and put first on PYTHONPATH. The pair order alternates (ABBA) so a drift in the machine's load
hits both sides. Reported: per-pair ratios new / base, their median, and whether the losses are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHILD = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train
root, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = TrainConfig(model=str(root / "model"), data=str(root / "train.jsonl"), out=str(out), max_steps=150,
                  per_device_train_batch_size=8, logging_steps=10, diagnostics_steps=50, progress=False, seed=1,
                  lora_dropout=0.1)
result = train(cfg)
print("RESULT " + json.dumps({"seconds": result.seconds, "last_loss": result.losses[-1], "file": __import__("lorakit").__file__}))
"""


def prepare(root: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from model_dirs import make_causal_lm_dir

    make_causal_lm_dir(root / "model", hidden=128, layers=2)
    records = [{"prompt": f"what is {a} plus {b} ?", "completion": f" {(a + b) % 10}"} for a in range(10) for b in range(10)]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def run_child(root: Path, src: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), LORAKIT_DATA_CACHE="0")
    done = subprocess.run([sys.executable, "-c", CHILD, str(root), str(out), str(REPO / "tests")], env=env,
                          capture_output=True, text=True, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the commit before the change")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="markdown report (default: stdout only)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorakit-loop-") as tmp:
        tmp_path = Path(tmp)
        worktree = tmp_path / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(worktree), args.base],
                       check=True)
        try:
            prepare(tmp_path)
            sides = {"base": worktree / "src", "new": REPO / "src"}
            rows = []
            for i in range(args.pairs):
                order = ("base", "new") if i % 2 == 0 else ("new", "base")
                got = {side: run_child(tmp_path, sides[side], tmp_path / f"run-{i}-{side}") for side in order}
                for side in got:
                    assert Path(got[side]["file"]).is_relative_to(sides[side].parent), got[side]["file"]
                rows.append(got)
                print(f"pair {i + 1}: base {got['base']['seconds']:.2f} s, new {got['new']['seconds']:.2f} s, "
                      f"ratio {got['new']['seconds'] / got['base']['seconds']:.3f}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=False)
    ratios = [r["new"]["seconds"] / r["base"]["seconds"] for r in rows]
    same_loss = all(r["new"]["last_loss"] == r["base"]["last_loss"] for r in rows)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    lines = [
        f"## Training loop: {commit} vs {args.base}, paired ({args.pairs} pairs, ABBA)",
        "",
        "Small Llama (hidden 128, 2 layers), 150 optimizer steps, batch 8, dropout 0.1, one thread; "
        "`TrainResult.seconds` per run (the loop only).",
        "",
        "| pair | base s | new s | new / base |",
        "|---|---|---|---|",
        *[f"| {i + 1} | {r['base']['seconds']:.2f} | {r['new']['seconds']:.2f} | {q:.3f} |"
          for i, (r, q) in enumerate(zip(rows, ratios))],
        "",
        f"Median new / base: **{statistics.median(ratios):.3f}** (min {min(ratios):.3f}, max {max(ratios):.3f}); "
        f"last losses identical in every pair: {same_loss}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
