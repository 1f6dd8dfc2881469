"""Loading-memory benchmark: peak resident memory while loading a bf16 checkpoint straight into NF4 (lorakit),
in bf16 (lorakit), and with transformers + bitsandbytes 4-bit, on the CPU.

* model: a Llama-style causal LM built once from a config (hidden 1024, 24 layers, intermediate 2816, 16 heads,
  4 key-value heads, vocab 32000, untied head: about 336 M parameters; quick: hidden 512, 8 layers, vocab 8000),
  saved in bf16 safetensors to a cache directory under the system temp dir (never in the repository).
* contestants, each in its own fresh child process (child.py), 3 rounds, order rotated:
    ``lorakit-nf4``   ``lorakit.load_model(dir, quantize="nf4")``: linears quantised as they are read;
    ``lorakit-bf16``  ``lorakit.load_model(dir, dtype="bf16")``;
    ``bnb-nf4``       ``AutoModelForCausalLM.from_pretrained(dir, quantization_config=BitsAndBytesConfig(
                      load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
                      dtype=torch.bfloat16, device_map="cpu")``.
* memory: each child imports torch, transformers, accelerate, lorakit (and bitsandbytes for its row) and the Llama
  modeling code, records its RSS, resets the kernel's high-water mark (/proc/self/clear_refs), loads, and reads the
  high-water mark (VmHWM): *peak growth* = VmHWM - RSS before loading. Also the bytes the loaded model holds
  (parameters, buffers, NF4 / bitsandbytes quantisation state; each storage once).

Goals: lorakit NF4 peak growth <= 1.3 x (NF4 model bytes + the largest checkpoint tensor, in bf16), and < the
transformers + bitsandbytes peak growth. If bitsandbytes cannot load on the CPU, its error is reported instead.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import child
import models
import tables as T

CONTESTANTS: tuple[str, ...] = ("lorakit-nf4", "lorakit-bf16", "bnb-nf4")
LABELS = {
    "lorakit-nf4": 'lorakit `load_model(quantize="nf4")`',
    "lorakit-bf16": 'lorakit `load_model(dtype="bf16")`',
    "bnb-nf4": "transformers + bitsandbytes `load_in_4bit` (nf4, bf16 compute)",
}
GOAL_VS_BOUND = 1.3  # NF4 peak growth / (NF4 model bytes + largest checkpoint tensor), at most


@dataclass(frozen=True)
class Sizes:
    """The model of this benchmark (full or quick) and the repetitions."""

    hidden: int = 1024
    layers: int = 24
    intermediate: int = 2816
    heads: int = 16
    kv_heads: int = 4
    vocab: int = 32000
    rounds: int = 3


FULL = Sizes()
QUICK = Sizes(hidden=512, layers=8, intermediate=1408, heads=8, kv_heads=4, vocab=8000, rounds=1)


def cache_dir(sizes: Sizes) -> Path:
    """Where the checkpoint of `sizes` is kept between runs (system temp dir; not part of the repository)."""
    tag = f"h{sizes.hidden}-l{sizes.layers}-i{sizes.intermediate}-a{sizes.heads}-{sizes.kv_heads}-v{sizes.vocab}"
    return Path(tempfile.gettempdir()) / "lorakit-bench-loading" / tag


# -- child side --------------------------------------------------------------------------------------------------
def run_build(args: dict[str, Any]) -> dict[str, Any]:
    """Build the Llama-style model (seed 0) and save it in bf16 safetensors, once: a finished directory has
    info.json (written last) and is reused. Returns the parameter count and the largest tensor's bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(args["dir"])
    info_path = out / "info.json"
    if info_path.is_file():
        return {**json.loads(info_path.read_text()), "cached": True}
    child._setup_torch(args["threads"])
    sizes = Sizes(**args["sizes"])
    config = LlamaConfig(hidden_size=sizes.hidden, num_hidden_layers=sizes.layers,
                         intermediate_size=sizes.intermediate, num_attention_heads=sizes.heads,
                         num_key_value_heads=sizes.kv_heads, vocab_size=sizes.vocab, tie_word_embeddings=False,
                         max_position_embeddings=2048)
    torch.manual_seed(models.SEED)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        info = {"params": params, "largest_tensor_bytes": largest, "dtype": "bfloat16",
                "file_bytes": sum(f.stat().st_size for f in tmp.glob("*.safetensors"))}
        (tmp / "info.json").write_text(json.dumps(info))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**info, "cached": False}


def _status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is no /proc."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _held_bytes(model: Any) -> int:
    """Bytes of every tensor the model holds: parameters, buffers, bitsandbytes QuantState tensors; each once."""
    import torch

    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        while state is not None:
            tensors += [v for v in vars(state).values() if isinstance(v, torch.Tensor)]
            state = getattr(state, "state2", None)
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _loader(name: str, directory: str) -> Callable[[], Any]:
    import torch
    import transformers

    models.ensure_lorakit_importable()
    import lorakit

    if name == "lorakit-nf4":
        return lambda: lorakit.load_model(directory, quantize="nf4", device="cpu")
    if name == "lorakit-bf16":
        return lambda: lorakit.load_model(directory, dtype="bf16", device="cpu")
    import bitsandbytes  # noqa: F401 - imported before the baseline, like lorakit

    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.bfloat16)
    return lambda: transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=quant, dtype=torch.bfloat16, device_map="cpu", local_files_only=True)


def run_load(args: dict[str, Any]) -> dict[str, Any]:
    """One contestant's load: peak RSS growth over the RSS before loading, load time, bytes held, a forward."""
    torch = child._setup_torch(args["threads"])
    import accelerate  # noqa: F401 - every contestant's libraries are imported before the baseline
    import transformers.models.llama.modeling_llama  # noqa: F401

    load = _loader(args["contestant"], args["dir"])
    before = _status_bytes("VmRSS")
    reset_ok = child.reset_peak()
    t0 = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")
    after = _status_bytes("VmRSS")
    held = _held_bytes(model)
    types = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
    with torch.inference_mode():
        logits = model(input_ids=torch.arange(8).reshape(1, 8)).logits
    return {"peak_growth_bytes": None if peak is None or before is None else peak - before,
            "rss_before_bytes": before, "rss_after_bytes": after, "load_s": load_s, "held_bytes": held,
            "hwm_reset": reset_ok, "linear_types": types, "logits_finite": bool(torch.isfinite(logits).all()),
            "threads": torch.get_num_threads()}


KINDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"loading_build": run_build, "loading": run_load}


# -- orchestrator side ---------------------------------------------------------------------------------------------
def bench(s: Any, execute: Callable[..., None]) -> dict[str, Any]:
    """Build (or reuse) the checkpoint, then load it with every contestant `rounds` times, order rotated."""
    sizes = QUICK if s.quick else FULL
    directory = str(cache_dir(sizes))
    results: dict[str, list[Any]] = {}
    execute([("build", {"kind": "loading_build", "threads": s.threads, "dir": directory,
                        "sizes": asdict(sizes)})], s, results)
    base = {"kind": "loading", "threads": s.threads, "dir": directory}
    for rnd in range(sizes.rounds):
        jobs = [(c, {**base, "contestant": c}) for c in CONTESTANTS]
        k = rnd % len(jobs)
        execute(jobs[k:] + jobs[:k], s, results)
    return {"settings": {**asdict(sizes), "threads": s.threads, "warmup": s.warmup, "dir": directory},
            "results": results}


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in T.ok(runs) if r.get(key) is not None]
    return T.stats(values)["median"] if values else None


def section(bench_dict: dict[str, Any], notes: list[str] | None = None) -> list[str]:
    """The markdown lines of the loading section of RESULTS.md; sanity warnings are appended to `notes`."""
    st, res = bench_dict["settings"], bench_dict["results"]
    build = next(iter(T.ok(res.get("build", []))), {})
    largest = build.get("largest_tensor_bytes")
    lines = [
        "## loading",
        "",
        f"Peak resident memory while loading a Llama-style model saved in bf16 safetensors (hidden {st['hidden']}, "
        f"{st['layers']} layers, intermediate {st['intermediate']}, {st['heads']} heads / {st['kv_heads']} key-value "
        f"heads, vocab {st['vocab']}, untied head: {build.get('params', 0) / 1e6:.1f} M parameters, "
        f"{_mib(build.get('file_bytes'))} MiB on disk) on the CPU, {st['threads']} threads. Each load in a fresh "
        f"process after its libraries are imported; *peak growth* = the kernel's RSS high-water mark during the "
        f"load minus the RSS before it. Medians of {st['rounds']} run(s); MiB.",
        "",
    ]
    rows = []
    for c in CONTESTANTS:
        runs = res.get(c, [])
        growth = [r["peak_growth_bytes"] / 2**20 for r in T.ok(runs) if r.get("peak_growth_bytes") is not None]
        spread = f" ({min(growth):.0f}-{max(growth):.0f})" if len(growth) > 1 else ""
        peak_cell = f"{T.stats(growth)['median']:.0f}{spread}" if growth else ("error" if runs else "skipped")
        load_s = _median(runs, "load_s")
        rows.append([LABELS[c], peak_cell, _mib(_median(runs, "held_bytes")), _mib(_median(runs, "rss_after_bytes")),
                     "n/a" if load_s is None else f"{load_s:.1f}", str(len(T.ok(runs)))])
    lines += T.table(["contestant", "peak growth", "model bytes", "RSS after load", "load s", "n"], rows)
    for c in CONTESTANTS:
        failed = [r for r in res.get(c, []) if not r.get("ok")]
        if failed:
            lines += ["", f"{LABELS[c]}: could not run: `{failed[0].get('error', 'unknown error')}`"]
        if notes is not None and any(not r.get("logits_finite", True) for r in T.ok(res.get(c, []))):
            notes.append(f"loading/{c}: the loaded model's logits are not finite")
    nf4_peak = _median(res.get("lorakit-nf4", []), "peak_growth_bytes")
    nf4_bytes = _median(res.get("lorakit-nf4", []), "held_bytes")
    bnb_peak = _median(res.get("bnb-nf4", []), "peak_growth_bytes")
    bound = nf4_bytes + largest if nf4_bytes is not None and largest is not None else None
    vs_bound = nf4_peak / bound if nf4_peak is not None and bound else None
    vs_bnb = nf4_peak / bnb_peak if nf4_peak is not None and bnb_peak else None
    lines += ["", f"NF4 model bytes (parameters, buffers, NF4 states): {_mib(nf4_bytes)} MiB; largest checkpoint "
                  f"tensor (bf16): {_mib(largest)} MiB; bound = their sum: {_mib(bound)} MiB.", "", "Goals:", ""]
    lines += T.table(["goal", "measured", "target", "result"], [
        T.goal("NF4 peak growth / (NF4 model bytes + largest tensor)", vs_bound, GOAL_VS_BOUND),
        ["NF4 peak growth / transformers + bitsandbytes peak growth", T.x(vs_bnb), "< 1.00x",
         T.pf(None if vs_bnb is None else vs_bnb < 1.0)],
    ])
    return lines
