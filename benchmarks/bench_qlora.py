"""QLoRA benchmark: lorakit's LoRA on an NF4 base vs lorakit's LoRA on the fp32 base vs PEFT + bitsandbytes QLoRA.

All on the CPU, side by side in one run, each configuration in its own fresh child process (child.py):

* model: ``models.build_base(hidden)`` (the core benchmark's 4-layer Llama-style model, fp32, fixed seed), hidden
  1024 (quick: 512), batch 4 x 256 (quick: 4 x 128); r = 16, alpha = 32 on all linear layers of the decoder
  (28 = 4 x 7; the LM head stays fp32 and unadapted in every contestant), dropout 0.
* contestants:
    ``lora``        lorakit LoRA on the fp32 base (``models.attach_lorakit``);
    ``qlora``       ``lorakit.quantize(model, "nf4", compute_dtype=torch.float32)`` then the same attach: the goal
                    contestant. fp32 compute, because the fp32 LoRA and PEFT + bitsandbytes contestants run in fp32
                    too, so only the storage differs;
    ``qlora-bf16``  the same with ``compute_dtype=torch.bfloat16`` (reported, no goal: on a CPU with AVX512-BF16
                    bf16 matmuls are much faster than fp32 ones, so it is not comparable with the fp32 LoRA step);
    ``peft-bnb``    the same weights saved to a temporary directory and loaded by transformers with
                    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.float32)``, then ``peft.get_peft_model`` with PEFT's LoraConfig
                    (r = 16, lora_alpha = 32, all-linear). No ``prepare_model_for_kbit_training``: it upcasts the
                    non-quantised parameters to fp32 (they already are) and turns on gradient checkpointing;
    ``peft-bnb-bf16`` the same with ``bnb_4bit_compute_dtype=torch.bfloat16`` (beside ``qlora-bf16``).
* step: forward + loss(labels = input_ids) + backward + zero_grad(set_to_none), in train mode; warm-up steps
  untimed, then each step timed (``child._measure_steps``: peak-RSS growth over warm-up and timed steps).
* base weight bytes: the bytes of every tensor held by the base modules of the 28 adapted layers (nn.Linear:
  weight; NF4Linear: codes, 8-bit scales, fp32 second-level scales and offset; bitsandbytes Linear4bit: the packed
  weight and every tensor of its QuantState), each storage counted once. Also the process RSS after the model is
  built (everything: embeddings, LM head, Python, libraries).

Goals: fp32 / NF4 base weight bytes >= 6x; QLoRA step / lorakit LoRA step <= 1.3x; QLoRA / PEFT + bitsandbytes
<= 1.0x. If PEFT + bitsandbytes cannot run on this CPU, its error is reported in place of a number.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import child
import models
import tables as T

CONTESTANTS: tuple[str, ...] = ("lora", "qlora", "peft-bnb", "qlora-bf16", "peft-bnb-bf16")
LABELS = {
    "lora": "lorakit LoRA, fp32 base",
    "qlora": "lorakit QLoRA, NF4 base, fp32 compute",
    "peft-bnb": "PEFT + bitsandbytes QLoRA, fp32 compute",
    "qlora-bf16": "lorakit QLoRA, NF4 base, bf16 compute",
    "peft-bnb-bf16": "PEFT + bitsandbytes QLoRA, bf16 compute",
}
# the PEFT + bitsandbytes row with the same compute dtype, for the "vs PEFT+bnb" column
SAME_DTYPE_PEFT = {"lora": "peft-bnb", "qlora": "peft-bnb", "peft-bnb": "peft-bnb", "qlora-bf16": "peft-bnb-bf16",
                   "peft-bnb-bf16": "peft-bnb-bf16"}
GOAL_BYTES = 6.0  # fp32 / NF4 base weight bytes, at least
GOAL_VS_LORA = 1.3  # QLoRA step / LoRA step, at most
GOAL_VS_PEFT = 1.0  # QLoRA step / PEFT + bitsandbytes step, at most


@dataclass(frozen=True)
class Sizes:
    """The sizes of this benchmark (full or quick)."""

    hidden: int = 1024
    batch: int = 4
    seq: int = 256
    steps: int = 5
    rounds: int = 2


FULL = Sizes()
QUICK = Sizes(hidden=512, seq=128, steps=2, rounds=1)


# -- child side --------------------------------------------------------------------------------------------------
def _held_bytes(modules: list[Any], extra: Callable[[Any], list[Any]] | None = None) -> int:
    """Bytes of the tensors held by `modules` (parameters, buffers, and `extra(module)`), each storage once."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        tensors = [*module.parameters(), *module.buffers()] + (extra(module) if extra else [])
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
    return total


def _quant_state_tensors(module: Any) -> list[Any]:
    """The tensors of a bitsandbytes Linear4bit's QuantState (absmax, code, offset, nested state's absmax, code)."""
    import torch

    state = getattr(getattr(module, "weight", None), "quant_state", None)
    found: list[Any] = []
    while state is not None:
        found += [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
        state = getattr(state, "state2", None)
    return found


def _build_lorakit(name: str, hidden: int, seq: int) -> tuple[Any, list[Any]]:
    import torch

    models.ensure_lorakit_importable()
    import lorakit
    from lorakit.model import lora_layers

    model = models.build_base(hidden, max_positions=seq)
    if name != "lora":
        dtype = torch.bfloat16 if name == "qlora-bf16" else torch.float32
        lorakit.quantize(model, "nf4", compute_dtype=dtype)
    models.attach_lorakit(model, 0.0)
    return model, [layer.base_layer for layer in lora_layers(model)]


def _build_peft_bnb(name: str, hidden: int, seq: int) -> tuple[Any, list[Any]]:
    import peft
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if name == "peft-bnb-bf16" else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="lorakit-qlora-bench-") as tmp:
        models.build_base(hidden, max_positions=seq).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=torch.float32,
                                                     device_map="cpu", local_files_only=True)
    model = models.attach_peft(model, 0.0)
    bases = [m.get_base_layer() for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    return model, bases


def run_qlora_train(args: dict[str, Any]) -> dict[str, Any]:
    """One contestant's training step: times, peak-RSS growth, base weight bytes, RSS after build."""
    torch = child._setup_torch(args["threads"])
    name, hidden, seq = args["contestant"], args["hidden"], args["seq"]
    if name.startswith("peft-bnb"):
        model, bases = _build_peft_bnb(name, hidden, seq)
    else:
        model, bases = _build_lorakit(name, hidden, seq)
    model.train()
    ids = models.make_inputs(args["batch"], seq)
    sanity: dict[str, Any] = {}

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    def first_step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        sanity["first_loss"] = float(loss.detach())
        sanity["tensors_with_grad"] = sum(1 for p in model.parameters() if p.grad is not None)
        model.zero_grad(set_to_none=True)

    base_bytes = _held_bytes(bases, _quant_state_tensors)
    built_rss = child.rss_mb()
    res = child._measure_steps(step, args["warmup"], args["steps"], first=first_step)
    res.update(sanity)
    res.update(base_weight_bytes=base_bytes, base_layers=len(bases), rss_after_build_mb=built_rss,
               base_types=sorted({type(b).__name__ for b in bases}), trainable_params=models.count_trainable(model),
               threads=torch.get_num_threads())
    return res


def run_qlora_paired(args: dict[str, Any]) -> dict[str, Any]:
    """lorakit's QLoRA (fp32 compute) and a reference (`args["reference"]`: 'peft-bnb' or 'lora') built in one
    process, their training steps alternated (ABBA); per-pair ratios QLoRA / reference (the goals use them)."""
    import time

    torch = child._setup_torch(args["threads"])
    hidden, seq = args["hidden"], args["seq"]
    ref_name = args["reference"]
    build_ref = _build_peft_bnb if ref_name.startswith("peft-bnb") else _build_lorakit
    reference, _ = build_ref(ref_name, hidden, seq)
    qlora, _ = _build_lorakit("qlora", hidden, seq)
    ids = models.make_inputs(args["batch"], seq)

    def step(model: Any) -> float:
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    reference.train()
    qlora.train()
    res = child.alternate_pairs(lambda: step(reference), lambda: step(qlora), args["warmup"], args["pairs"])
    return {**res, "threads": torch.get_num_threads()}


KINDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "qlora_train": run_qlora_train,
    "qlora_paired": run_qlora_paired,
}
PAIRED_REFERENCES = ("peft-bnb", "lora")  # QLoRA (fp32 compute) alternated with each of these in one process


# -- orchestrator side ---------------------------------------------------------------------------------------------
def bench(s: Any, execute: Callable[..., None]) -> dict[str, Any]:
    """Run every contestant `rounds` times (order rotated each round) through `execute` (run.py's _execute)."""
    sizes = QUICK if s.quick else FULL
    results: dict[str, list[Any]] = {}
    base = {"kind": "qlora_train", "threads": s.threads, "hidden": sizes.hidden, "batch": sizes.batch,
            "seq": sizes.seq, "warmup": s.warmup, "steps": sizes.steps}
    for rnd in range(sizes.rounds):
        jobs = [(c, {**base, "contestant": c}) for c in CONTESTANTS]
        jobs += [(f"paired/{ref}", {**base, "kind": "qlora_paired", "reference": ref, "pairs": sizes.steps})
                 for ref in PAIRED_REFERENCES]
        k = rnd % len(jobs)
        execute(jobs[k:] + jobs[:k], s, results)
    return {"settings": {**asdict(sizes), "warmup": s.warmup, "threads": s.threads}, "results": results}


def _mib(n: float | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def _first(runs: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in T.ok(runs) if key in r), None)


def _sanity(res: dict[str, list[Any]], notes: list[str]) -> None:
    """Append to the report's sanity warnings: a non-finite first loss, no gradient, a busy machine."""
    for c in CONTESTANTS:
        for r in T.ok(res.get(c, [])):
            if not math.isfinite(r.get("first_loss", float("nan"))) or not r.get("tensors_with_grad"):
                notes.append(f"qlora/{c}: first loss {r.get('first_loss')}, {r.get('tensors_with_grad')} tensors "
                             f"with a gradient")
            if r.get("foreign_cpu_share", 0.0) > 0.10:
                notes.append(f"qlora/{c}: other processes used {r['foreign_cpu_share']:.0%} of the CPUs while timing")


def section(bench_dict: dict[str, Any], notes: list[str] | None = None) -> list[str]:
    """The markdown lines of the QLoRA section of RESULTS.md; sanity warnings are appended to `notes`."""
    st, res = bench_dict["settings"], bench_dict["results"]
    if notes is not None:
        _sanity(res, notes)
    times = {c: T.pooled(res.get(c, []), "times_s") for c in CONTESTANTS}
    lines = [
        "## qlora",
        "",
        f"Training step (forward + loss + backward + zero_grad) of the core benchmark's Llama-style model, hidden "
        f"{st['hidden']}, batch {st['batch']} x {st['seq']}, r = 16 on the 28 decoder linear layers, dropout 0, "
        f"{st['threads']} threads; {st['rounds']} round(s) x {st['steps']} timed steps after {st['warmup']} warm-up "
        f"step(s), each contestant in a fresh process. *Base weights*: bytes of the tensors held by the 28 adapted "
        f"layers' base modules. *RSS after build*: the whole process once the model is built. Times in ms. The goals "
        f"use fp32 compute, like the LoRA and PEFT + bitsandbytes fp32 rows, so that only the base's storage differs; "
        f"bf16 compute is shown beside PEFT + bitsandbytes in bf16.",
        "",
    ]
    rows = []
    for c in CONTESTANTS:
        runs = res.get(c, [])
        mem_cell, _ = T.mem(runs)
        rows.append([LABELS[c], *T.time_cells(times[c], runs), T.x(T.ratio(times[c], times["lora"])),
                     T.x(T.ratio(times[c], times[SAME_DTYPE_PEFT[c]])), mem_cell,
                     _mib(_first(runs, "base_weight_bytes")),
                     f"{_first(runs, 'rss_after_build_mb'):.0f}" if _first(runs, "rss_after_build_mb") else "",
                     T.busy(runs)])
    lines += T.table(["contestant", "median", "IQR", "min-max", "n", "vs lorakit LoRA", "vs PEFT+bnb same dtype",
                      "peak growth MiB", "base weights MiB", "RSS after build MiB", "other CPU"], rows)
    for c in CONTESTANTS:
        failed = [r for r in res.get(c, []) if not r.get("ok")]
        if failed:
            lines += ["", f"{LABELS[c]}: could not run: `{failed[0].get('error', 'unknown error')}`"]
    paired = {ref: T.pooled(res.get(f"paired/{ref}", []), "ratios") for ref in PAIRED_REFERENCES}
    if any(paired.values()):
        lines += ["", "Paired (QLoRA fp32 compute and the reference built in one process, steps alternated ABBA, "
                      "median of the per-pair ratios; the goals use these):", ""]
        lines += T.table(["QLoRA / reference", "median", "IQR", "n", "other CPU"], [
            [LABELS[ref], T.x(st_.get("median")), f"{st_['q1']:.3f}-{st_['q3']:.3f}" if st_ else "", str(st_.get("n", 0)),
             T.busy(res.get(f"paired/{ref}", []))] for ref, st_ in paired.items()])
    vs_lora = paired["lora"].get("median") if paired["lora"] else T.ratio(times["qlora"], times["lora"])
    vs_peft = paired["peft-bnb"].get("median") if paired["peft-bnb"] else T.ratio(times["qlora"], times["peft-bnb"])
    fp32_bytes = _first(res.get("lora", []), "base_weight_bytes")
    nf4_bytes = _first(res.get("qlora", []), "base_weight_bytes")
    shrink = fp32_bytes / nf4_bytes if fp32_bytes and nf4_bytes else None
    lines += ["", "Goals:", ""]
    lines += T.table(["goal", "measured", "target", "result"], [
        ["base weight bytes: fp32 / NF4", "n/a" if shrink is None else f"{shrink:.2f}x", f">= {GOAL_BYTES:.1f}x",
         T.pf(None if shrink is None else shrink >= GOAL_BYTES)],
        T.goal("QLoRA (fp32 compute) / lorakit LoRA step", vs_lora, GOAL_VS_LORA),
        T.goal("QLoRA (fp32 compute) / PEFT + bitsandbytes step", vs_peft, GOAL_VS_PEFT),
    ])
    return lines
