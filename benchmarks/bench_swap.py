"""Hot-swap benchmark: replace the weights of a loaded adapter from a file, lorakit vs PEFT, on the CPU.

Each contestant runs in its own fresh child process (child.py):

* model: ``models.build_base(hidden)`` (the core benchmark's 4-layer Llama-style model, fp32, fixed seed), hidden
  1024 (quick: 512), eval mode. Adapter files: LoRA on all linear layers of the decoder (28 = 4 x 7), written by
  ``lorakit.save_adapter`` in the child before timing (A and B random, fixed seeds): two files of r = 16, alpha = 32
  ("same rank"), and one of r = 8, alpha = 32 (another rank and another scale, for the padded contestants).
* one swap = read the adapter directory (files in the OS page cache after the first read), validate it, write
  the new weights into the loaded adapter. The model swaps back and forth between two files; ``warmup`` swaps
  are untimed, then each swap is timed with ``time.perf_counter`` (``child._measure_steps``).
* contestants:
    ``lorakit``         ``lorakit.swap_adapter(model, "default", dir)``, two r = 16 files;
    ``lorakit-padded``  ``lorakit.prepare_swap(model, max_rank=32)`` first, then the r = 16 and the r = 8 file;
    ``peft``            ``peft.utils.hotswap.hotswap_adapter(model, dir, adapter_name="default",
                        torch_device="cpu")`` on ``PeftModel.from_pretrained``, two r = 16 files;
    ``peft-padded``     ``prepare_model_for_compiled_hotswap(model, target_rank=32)`` first, then the r = 16 and
                        the r = 8 file;
    ``lorakit-reload``  no hot swap: ``load_adapter`` of the file under a new name, ``set_active``, then
                        ``delete_adapter`` of the old one (what a swap replaces), two r = 16 files.
* per MB: each swap's time divided by the size of the weights file it read (adapter_model.safetensors).
* check: after the timed swaps, the logits (1 x 16 tokens) against a fresh load of the last file swapped in
  onto a freshly built base, by the same library.

Goals: lorakit swap / PEFT hotswap_adapter <= 1.0x (same rank, and padded); lorakit swap / lorakit reload
<= 1.0x; logits after a swap equal a fresh load's to 1e-5.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import child
import models
import tables as T

CONTESTANTS: tuple[str, ...] = ("lorakit", "lorakit-padded", "peft", "peft-padded", "lorakit-reload")
LABELS = {
    "lorakit": "lorakit swap_adapter, r 16 -> 16",
    "lorakit-padded": "lorakit swap_adapter, padded to 32, r 16 <-> 8",
    "peft": "PEFT hotswap_adapter, r 16 -> 16",
    "peft-padded": "PEFT hotswap_adapter, padded to 32, r 16 <-> 8",
    "lorakit-reload": "lorakit load_adapter + delete_adapter, r 16",
}
MAX_RANK = 32  # the declared maximum of the padded contestants
SMALL_RANK = 8  # the second file of the padded contestants (alpha unchanged: another scale too)
GOAL_VS_PEFT = 1.0  # lorakit swap / PEFT hotswap_adapter, at most
GOAL_VS_RELOAD = 1.0  # lorakit swap / lorakit load + delete, at most
GOAL_LOGITS = 1e-5  # max abs logit difference after a swap vs a fresh load, at most


@dataclass(frozen=True)
class Sizes:
    """The sizes of this benchmark (full or quick)."""

    hidden: int = 1024
    swaps: int = 20  # timed swaps per child
    warmup: int = 2  # untimed swaps first
    rounds: int = 2


FULL = Sizes()
QUICK = Sizes(hidden=512, swaps=4, warmup=1, rounds=1)


# -- child side --------------------------------------------------------------------------------------------------
def _write_files(hidden: int, directory: str, ranks: tuple[int, ...]) -> list[str]:
    """Save one all-linear adapter file per rank (alpha 32, random A and B, seed i) with lorakit; their dirs."""
    import torch

    models.ensure_lorakit_importable()
    import lorakit

    lorakit.tune_cpu_allocator()  # explicit, as in models.attach_lorakit
    model = models.build_base(hidden)
    paths = []
    for i, rank in enumerate(ranks):
        lorakit.attach(model, lorakit.LoraConfig(r=rank, alpha=models.LORA_ALPHA, target_modules="all-linear"))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:  # the adapter's A and B
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        paths.append(str(lorakit.save_adapter(model, os.path.join(directory, f"file{i}-r{rank}"))))
        lorakit.delete_adapter(model, "default")
    return paths


def _lorakit_swapper(hidden: int, first: str, contestant: str) -> tuple[Any, Callable[[str], None]]:
    models.ensure_lorakit_importable()
    import lorakit

    model = lorakit.load_adapter(models.build_base(hidden), first)
    if contestant == "lorakit-padded":
        lorakit.prepare_swap(model, max_rank=MAX_RANK)
    if contestant != "lorakit-reload":
        return model, lambda path: lorakit.swap_adapter(model, "default", path)
    names = iter(f"a{i}" for i in range(1, 10**6))
    current = ["default"]

    def reload(path: str) -> None:
        name = next(names)
        lorakit.load_adapter(model, path, name=name)
        lorakit.set_active(model, [name])
        lorakit.delete_adapter(model, current[0])
        current[0] = name

    return model, reload


def _peft_swapper(hidden: int, first: str, contestant: str) -> tuple[Any, Callable[[str], None]]:
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    model = PeftModel.from_pretrained(models.build_base(hidden), first)
    if contestant == "peft-padded":
        prepare_model_for_compiled_hotswap(model, target_rank=MAX_RANK, config=model.peft_config)
    return model, lambda path: hotswap_adapter(model, path, adapter_name="default", torch_device="cpu")


def _fresh_logits(library: str, hidden: int, path: str, probe: Any) -> Any:
    import torch

    base = models.build_base(hidden)
    if library == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, path)
    else:
        import lorakit

        model = lorakit.load_adapter(base, path)
    model.eval()
    with torch.inference_mode():
        return model(input_ids=probe).logits


def run_swap(args: dict[str, Any]) -> dict[str, Any]:
    """One contestant: swap times, sizes of the files read, logits after the last swap vs a fresh load."""
    torch = child._setup_torch(args["threads"])
    contestant, hidden = args["contestant"], args["hidden"]
    padded = contestant.endswith("-padded")
    library = contestant.partition("-")[0]
    probe = models.make_inputs(1, 16)
    with tempfile.TemporaryDirectory(prefix="lorakit-swap-bench-") as tmp:
        first, second = _write_files(hidden, tmp, (models.LORA_R, SMALL_RANK if padded else models.LORA_R))
        build = _peft_swapper if library == "peft" else _lorakit_swapper
        model, swap = build(hidden, first, contestant)
        model.eval()
        sizes_mb: list[float] = []
        order = [second, first]

        def step() -> None:
            path = order[len(sizes_mb) % 2]
            swap(path)
            sizes_mb.append(models.weight_file_bytes(path) / 1e6)

        res = child._measure_steps(step, args["warmup"], args["swaps"])
        last = order[(len(sizes_mb) - 1) % 2]
        with torch.inference_mode():
            got = model(input_ids=probe).logits
        diff = float((got - _fresh_logits(library, hidden, last, probe)).abs().max())
    timed_mb = sizes_mb[-len(res["times_s"]):]
    res.update(
        mb_per_swap=timed_mb,
        s_per_mb=[t / mb for t, mb in zip(res["times_s"], timed_mb)],
        logits_vs_fresh_load=diff,
        threads=torch.get_num_threads(),
    )
    return res


KINDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"swap": run_swap}


# -- orchestrator side ---------------------------------------------------------------------------------------------
def bench(s: Any, execute: Callable[..., None]) -> dict[str, Any]:
    """Run every contestant `rounds` times (order rotated each round) through `execute` (run.py's _execute)."""
    sizes = QUICK if s.quick else FULL
    results: dict[str, list[Any]] = {}
    base = {"kind": "swap", "threads": s.threads, "hidden": sizes.hidden, "swaps": sizes.swaps,
            "warmup": sizes.warmup}
    for rnd in range(sizes.rounds):
        jobs = [(c, {**base, "contestant": c}) for c in CONTESTANTS]
        k = rnd % len(jobs)
        execute(jobs[k:] + jobs[:k], s, results)
    return {"settings": {**asdict(sizes), "threads": s.threads, "r": models.LORA_R, "max_rank": MAX_RANK,
                         "small_rank": SMALL_RANK}, "results": results}


def _mb_cell(runs: list[dict[str, Any]]) -> str:
    sizes = sorted({round(mb, 2) for r in T.ok(runs) for mb in r.get("mb_per_swap", [])})
    return " / ".join(f"{mb:.2f}" for mb in sizes)


def _diff(runs: list[dict[str, Any]]) -> float | None:
    vals = [r["logits_vs_fresh_load"] for r in T.ok(runs) if "logits_vs_fresh_load" in r]
    return max(vals) if vals else None


def section(bench_dict: dict[str, Any], notes: list[str] | None = None) -> list[str]:
    """The markdown lines of the hot-swap section of RESULTS.md."""
    st, res = bench_dict["settings"], bench_dict["results"]
    times = {c: T.pooled(res.get(c, []), "times_s") for c in CONTESTANTS}
    per_mb = {c: T.pooled(res.get(c, []), "s_per_mb") for c in CONTESTANTS}
    lines = [
        "## hot swap",
        "",
        f"Replacing the weights of a loaded adapter from a file, on the core benchmark's Llama-style model, hidden "
        f"{st['hidden']}, eval mode, LoRA (alpha 32) on the 28 decoder linear layers, {st['threads']} threads. The "
        f"model swaps back and forth between two adapter files (r = {st['r']} and r = {st['r']}; padded contestants: "
        f"max rank {st['max_rank']}, r = {st['r']} and r = {st['small_rank']}, so the scale changes too); "
        f"{st['rounds']} round(s) x {st['swaps']} timed swaps after {st['warmup']} untimed, each contestant in a "
        f"fresh process, files in the page cache. A swap reads, checks and copies. *ms per MB*: each swap's time "
        f"over the size of the weights file it read. *vs fresh load*: max abs logit difference after the last swap "
        f"against a fresh load of that file by the same library. Times in ms.",
        "",
    ]
    rows = []
    for c in CONTESTANTS:
        runs = res.get(c, [])
        ref = times["peft-padded" if c.endswith("padded") else "peft"]
        diff = _diff(runs)
        rows.append([LABELS[c], *T.time_cells(times[c], runs),
                     T.ms(per_mb[c]["median"]) if per_mb[c] else "", _mb_cell(runs),
                     T.x(T.ratio(times[c], ref)), "" if diff is None else f"{diff:.1e}", T.busy(runs)])
    lines += T.table(["contestant", "median", "IQR", "min-max", "n", "ms per MB", "file MB", "vs PEFT (same kind)",
                      "vs fresh load", "other CPU"], rows)
    for c in CONTESTANTS:
        failed = [r for r in res.get(c, []) if not r.get("ok")]
        if failed:
            lines += ["", f"{LABELS[c]}: could not run: `{failed[0].get('error', 'unknown error')}`"]
    worst = [d for d in (_diff(res.get(c, [])) for c in ("lorakit", "lorakit-padded")) if d is not None]
    lines += ["", "Goals:", ""]
    lines += T.table(["goal", "measured", "target", "result"], [
        T.goal("lorakit swap / PEFT hotswap_adapter, same rank", T.ratio(times["lorakit"], times["peft"]),
               GOAL_VS_PEFT),
        T.goal("lorakit swap / PEFT hotswap_adapter, padded, rank change",
               T.ratio(times["lorakit-padded"], times["peft-padded"]), GOAL_VS_PEFT),
        T.goal("lorakit swap / lorakit load_adapter + delete_adapter", T.ratio(times["lorakit"],
               times["lorakit-reload"]), GOAL_VS_RELOAD),
        ["lorakit logits after a swap vs a fresh load (max abs)", "n/a" if not worst else f"{max(worst):.1e}",
         f"<= {GOAL_LOGITS:.0e}", T.pf(None if not worst else max(worst) <= GOAL_LOGITS)],
    ])
    return lines + ([""] + list(notes) if notes else [])
