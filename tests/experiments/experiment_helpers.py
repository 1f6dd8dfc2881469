"""Shared helpers of the experiment tests: a tiny classification / causal-LM data file in the words of
tests/model_dirs.py's tokenizer, a tiny Task built from the conftest model directories, and a fake train_run.
(No conftest.py here: it would shadow tests/conftest.py.)"""

from __future__ import annotations

import json
import random
from pathlib import Path

from model_dirs import WORDS

LABEL_WORDS = {"positive": ["good", "happy", "yes", "big", "hot"], "negative": ["bad", "sad", "no", "small", "cold"]}


def write_classification_jsonl(path: Path, n: int = 40, seed: int = 0) -> Path:
    """n {text, label} records: a label's texts use that label's words among common words (learnable)."""
    rng = random.Random(seed)
    common = [w for w in WORDS if w.isalpha()][:30]
    lines = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(common, 4) + rng.sample(LABEL_WORDS[label], 2)
        rng.shuffle(words)
        lines.append(json.dumps({"text": " ".join(words), "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


def write_text_jsonl(path: Path, n: int = 30, seed: int = 0) -> Path:
    """n {text} records of counting words (a causal-LM task)."""
    rng = random.Random(seed)
    numbers = "zero one two three four five six seven eight nine ten".split()
    lines = []
    for _ in range(n):
        start = rng.randrange(0, 5)
        lines.append(json.dumps({"text": " ".join(numbers[start:start + 6])}))
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_task(model_dir: Path, data: Path, quick: bool = True, steps: int = 3):
    """load_task on a tiny model directory and data file, with `steps` optimizer steps and a small batch."""
    from lorakit.experiments.core import load_task

    task = load_task(str(model_dir), str(data), quick=quick, seed=0, device="cpu")
    task.settings.update(steps=steps, batch_size=4, eval_batch_size=8, max_length=16)
    return task


def run_quietly(module, task, out: Path):
    """module.run(task, out, quick=True) with a fresh CellStore, its printed table captured: (results, printed)."""
    import contextlib
    import io

    from lorakit.experiments.core import CellStore

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = module.run(task, out, quick=True, seeds=None, store=CellStore(out, module.NAME, {"seeds": None}),
                             progress_stream=io.StringIO())
    return results, printed.getvalue()
