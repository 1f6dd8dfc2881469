"""Measurements that run inside one fresh child process (``run.py --child ...``).

Each child builds exactly one contestant, measures it, and prints one JSON line on stdout
prefixed with ``RESULT_MARKER``.  Kinds:

* ``train``  -- training step = forward + loss(labels=input_ids) + backward + zero_grad(set_to_none),
               ``model.train()``; per-step wall time (time.perf_counter) after ``warmup`` untimed
               steps, plus peak-RSS growth over all steps (warm-up included).
* ``train_paired`` / ``infer_paired`` -- FLOOR (base) and one contestant in the same process, training
               steps (forwards) alternated in ABBA order; per-pair time ratios (the time goals use them).
* ``infer``  -- forward of the unmerged model in eval mode under ``torch.inference_mode()``.
* ``io``     -- merge_and_unload time, adapter save time, adapter load time, adapter size on disk.

Peak memory: baseline = current RSS (psutil) right after model build + input creation; then the
kernel's RSS high-water mark is reset (``echo 5 > /proc/self/clear_refs``) so that
``getrusage(RUSAGE_SELF).ru_maxrss`` after the steps is the peak of the measured phase only;
reported figure = peak - baseline in MiB.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import models

RESULT_MARKER = "@@LORAKIT_BENCH_RESULT@@"
MIB = 1024.0 * 1024.0


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MIB


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def minor_faults() -> int:
    """Minor page faults of this process so far (each: a fresh page mapped in and zeroed by the kernel)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _cpu_busy_s() -> tuple[float, float]:
    """(CPU seconds used by the whole machine, CPU seconds used by this process) so far."""
    import psutil

    t = psutil.cpu_times()
    busy = t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    busy += getattr(t, "steal", 0.0)
    own = psutil.Process().cpu_times()
    return busy, own.user + own.system


def _cpu_mark() -> tuple[float, float, float]:
    """(machine CPU s, own CPU s, wall s) now: the start of a window for `_foreign_share`."""
    return (*_cpu_busy_s(), time.perf_counter())


def _foreign_share(start: tuple[float, float, float]) -> float:
    """Share of the machine's CPU capacity used by *other* processes (and hypervisor steal) since `start`."""
    busy0, own0, wall0 = start
    wall = time.perf_counter() - wall0
    busy1, own1 = _cpu_busy_s()
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(wall * (os.cpu_count() or 1), 1e-9)


def _setup_torch(threads: int) -> Any:
    import torch

    torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float32)
    return torch


def _measure_steps(
    step: Callable[[], None], warmup: int, steps: int, first: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Baseline RSS, reset HWM, run warm-up + timed steps, return times and memory.

    ``first`` (if given) replaces the first warm-up step, e.g. to also run sanity checks.
    """
    gc.collect()
    baseline = rss_mb()
    build_peak = maxrss_mb()
    reset_ok = reset_peak()
    for i in range(max(warmup, 1 if first else 0)):
        (first if (i == 0 and first is not None) else step)()
    times: list[float] = []
    faults: list[int] = []
    mark = _cpu_mark()
    for _ in range(steps):
        f0 = minor_faults()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        faults.append(minor_faults() - f0)
    own_s = _cpu_busy_s()[1] - mark[1]
    foreign = _foreign_share(mark)
    peak = maxrss_mb()
    return {
        "times_s": times,
        "faults_per_step": faults,
        "baseline_rss_mb": baseline,
        "build_peak_rss_mb": build_peak,
        "peak_rss_mb": peak,
        "peak_growth_mb": peak - baseline,
        "hwm_reset": reset_ok,
        "foreign_cpu_share": foreign,
        "own_cpu_s_per_step": own_s / max(steps, 1),
    }


def run_train(args: dict[str, Any]) -> dict[str, Any]:
    torch = _setup_torch(args["threads"])
    name, hidden, dropout = args["contestant"], args["hidden"], args["dropout"]
    model = models.build_contestant(name, hidden, dropout, max_positions=args["seq"])
    model.train()
    ids = models.make_inputs(args["batch"], args["seq"])
    n_trainable = models.count_trainable(model)

    trainable_tensors = sum(1 for p in model.parameters() if p.requires_grad)
    sanity: dict[str, Any] = {}

    def step() -> None:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    def first_step() -> None:
        # The first warm-up step also records the loss and how many parameters received a grad.
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        sanity["tensors_with_grad"] = sum(1 for p in model.parameters() if p.grad is not None)
        sanity["first_loss"] = float(loss.detach())
        model.zero_grad(set_to_none=True)

    res = _measure_steps(step, args["warmup"], args["steps"], first=first_step)
    res.update(sanity)
    res.update(
        trainable_params=n_trainable,
        trainable_tensors=trainable_tensors,
        threads=torch.get_num_threads(),
    )
    return res


def alternate_pairs(
    reference: Callable[[], float], other: Callable[[], float], warmup: int, pairs: int
) -> dict[str, Any]:
    """Warm both up, then time `pairs` back-to-back pairs in ABBA order (reference first in even pairs).

    Each callable runs one step and returns its seconds. Returns the per-pair ratios other / reference, both
    lists of times and the share of the CPUs other processes used meanwhile.
    """
    for _ in range(warmup):
        reference()
        other()
    ref_s: list[float] = []
    other_s: list[float] = []
    faults: dict[str, list[int]] = {"ref": [], "other": []}

    def timed(side: str, fn: Callable[[], float], into: list[float]) -> None:
        f0 = minor_faults()
        into.append(fn())
        faults[side].append(minor_faults() - f0)

    mark = _cpu_mark()
    for i in range(pairs):
        if i % 2 == 0:
            timed("ref", reference, ref_s)
            timed("other", other, other_s)
        else:
            timed("other", other, other_s)
            timed("ref", reference, ref_s)
    return {
        "ratios": [o / r for o, r in zip(other_s, ref_s, strict=True)],
        "times_s": other_s,
        "reference_times_s": ref_s,
        "faults_per_step": faults["other"],
        "reference_faults_per_step": faults["ref"],
        "foreign_cpu_share": _foreign_share(mark),
    }


def run_paired(args: dict[str, Any]) -> dict[str, Any]:
    """A reference and one contestant built in the same process, their steps alternated (ABBA order).

    Kind ``train_paired``: training steps, reference FLOOR; kind ``infer_paired``: eval forwards under
    inference_mode, reference the base model. ``reference`` (a contestant name) replaces the default reference,
    e.g. lorakit's LoRA as the reference of its DoRA. Each pair is one reference step and one contestant step taken
    back to back, so a slow phase of the machine hits both; the per-pair ratio contestant / reference is what
    the time goals use. Memory is not measured here (two models share the process): the one-contestant
    children measure it.
    """
    torch = _setup_torch(args["threads"])
    hidden, seq = args["hidden"], args["seq"]
    train = args["kind"] == "train_paired"
    dropout = args.get("dropout", 0.0)
    reference = args.get("reference") or ("floor" if train else "base")
    floor = models.build_contestant(reference, hidden, 0.0, max_positions=seq).train(train)
    other = models.build_contestant(args["contestant"], hidden, dropout, max_positions=seq).train(train)
    ids = models.make_inputs(args["batch"], seq)

    def step(model: Any) -> float:
        t0 = time.perf_counter()
        if train:
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                model(input_ids=ids)
        return time.perf_counter() - t0

    res = alternate_pairs(lambda: step(floor), lambda: step(other), args["warmup"], args["pairs"])
    return {**res, "threads": torch.get_num_threads()}


def run_infer(args: dict[str, Any]) -> dict[str, Any]:
    torch = _setup_torch(args["threads"])
    model = models.build_contestant(args["contestant"], args["hidden"], 0.0, max_positions=args["seq"])
    model.eval()
    ids = models.make_inputs(args["batch"], args["seq"])

    def step() -> None:
        with torch.inference_mode():
            model(input_ids=ids)

    res = _measure_steps(step, args["warmup"], args["steps"])
    res["threads"] = torch.get_num_threads()
    return res


def run_io(args: dict[str, Any]) -> dict[str, Any]:
    torch = _setup_torch(args["threads"])
    name, hidden, reps = args["contestant"], args["hidden"], args["reps"]
    warm = int(args.get("warmup", 1))  # untimed first repetitions: one-off lazy initialisation
    merge_s: list[float] = []
    save_s: list[float] = []
    load_s: list[float] = []
    size_total = size_weights = 0
    probe = models.make_inputs(1, 16)
    max_merge_diff = max_roundtrip_diff = 0.0
    b_changed = 0
    mark = _cpu_mark()
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        for rep in range(warm + reps):
            timed = rep >= warm
            model = models.build_contestant(name, hidden, 0.0)
            b_changed = _randomize_lora_b(model)
            model.eval()
            with torch.inference_mode():
                before = model(input_ids=probe).logits
            gc.collect()
            t0 = time.perf_counter()
            merged = models.merge(name, model)
            if timed:
                merge_s.append(time.perf_counter() - t0)
            with torch.inference_mode():
                after = merged(input_ids=probe).logits
            max_merge_diff = max(max_merge_diff, float((after - before).abs().max()))
            del merged, model, before, after

            model = models.build_contestant(name, hidden, 0.0)
            _randomize_lora_b(model)
            model.eval()
            with torch.inference_mode():
                saved_logits = model(input_ids=probe).logits
            out_dir = os.path.join(tmp, f"{name}-{rep}")
            gc.collect()
            t0 = time.perf_counter()
            models.save(name, model, out_dir)
            if timed:
                save_s.append(time.perf_counter() - t0)
            size_total = models.dir_size_bytes(out_dir)
            size_weights = models.weight_file_bytes(out_dir)
            del model

            base = models.build_base(hidden)
            gc.collect()
            t0 = time.perf_counter()
            loaded = models.load(name, base, out_dir)
            if timed:
                load_s.append(time.perf_counter() - t0)
            loaded.eval()
            with torch.inference_mode():
                diff = float((loaded(input_ids=probe).logits - saved_logits).abs().max())
            max_roundtrip_diff = max(max_roundtrip_diff, diff)
            del loaded, base, saved_logits
    foreign = _foreign_share(mark)
    return {
        "foreign_cpu_share": foreign,
        "merge_s": merge_s,
        "save_s": save_s,
        "load_s": load_s,
        "adapter_bytes": size_total,
        "adapter_weight_bytes": size_weights,
        "merge_max_abs_diff": max_merge_diff,
        "roundtrip_max_abs_diff": max_roundtrip_diff,
        "lora_b_tensors_randomized": b_changed,
        "threads": torch.get_num_threads(),
    }


def _randomize_lora_b(model: Any) -> int:
    """Give LoRA 'B' matrices non-zero values so that merging changes weights (checked via logits).

    Returns how many tensors were changed (0 means the merge check is vacuous).
    """
    import torch

    gen = torch.Generator().manual_seed(123)
    changed = 0
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.requires_grad and "lora_b" in pname.lower():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
                changed += 1
    return changed


def run_init(args: dict[str, Any]) -> dict[str, Any]:
    """Time a residual initialisation (PiSSA / OLoRA: ``args['init']``) of one d x d Linear, per matrix.

    The contestant attaches an adapter of rank r=16 whose init factorises the weight; the time of that call
    (attach / get_peft_model), minus nothing, is reported per matrix. The base is rebuilt for each repetition.
    """
    torch = _setup_torch(args["threads"])
    size, init, reps = args["size"], args["init"], args["reps"]
    times: list[float] = []
    for rep in range(reps + 1):  # the first repetition is a warm-up (lazy initialisation of LAPACK etc.)
        torch.manual_seed(models.SEED)
        model = torch.nn.Sequential(torch.nn.Linear(size, size, bias=False))
        t0 = time.perf_counter()
        if args["contestant"] == "peft":
            import peft

            cfg = peft.LoraConfig(r=models.LORA_R, lora_alpha=models.LORA_ALPHA, target_modules=["0"],
                                  init_lora_weights=init)
            peft.get_peft_model(model, cfg)
        else:
            models.ensure_lorakit_importable()
            import lorakit

            lorakit.attach(model, lorakit.LoraConfig(r=models.LORA_R, alpha=models.LORA_ALPHA,
                                                     target_modules=["0"], init=init))
        if rep:
            times.append(time.perf_counter() - t0)
    return {"times_s": times, "threads": torch.get_num_threads()}


KINDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "train": run_train,
    "train_paired": run_paired,
    "infer_paired": run_paired,
    "infer": run_infer,
    "io": run_io,
    "init": run_init,
}


# benchmarks kept in their own modules: name -> module exposing KINDS, bench(s, execute), section(bench, notes)
EXTRA_MODULES = {"qlora": "bench_qlora", "swap": "bench_swap", "mixed_batch": "bench_mixed",
                 "loading": "bench_loading", "train_loop": "bench_loop"}


def extra_module(name: str) -> Any:
    """Import the module of benchmark `name` and register its child kinds."""
    import importlib

    module = importlib.import_module(EXTRA_MODULES[name])
    KINDS.update(module.KINDS)
    return module


def main(payload: str) -> int:
    """Entry point for ``run.py --child JSON``: prints one marker line with a JSON object."""
    args = json.loads(payload)
    if args["kind"] not in KINDS:
        for name in EXTRA_MODULES:
            extra_module(name)
    try:
        result = KINDS[args["kind"]](args)
        result["ok"] = True
        code = 0
    except Exception as exc:  # report any failure to the parent instead of a bare traceback
        result = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-4000:],
        }
        code = 1
    sys.stdout.write(RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    return code
