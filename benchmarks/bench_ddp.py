"""DDP / FSDP benchmark on the CPU: bytes all-reduced per step with LoRA r=8 vs full fine-tuning of the same model
(counted by lorakit.distributed.comm's DDP hook), step times, and memory per rank with FSDP2 vs DDP.

    .venv/bin/python benchmarks/bench_ddp.py [--hidden 1024] [--steps 4] [--out benchmarks/RESULTS-ddp.md]

The parent launches `python -m torch.distributed.run --nproc-per-node 2` (gloo, OMP_NUM_THREADS=1) once per mode,
each child rank building the same model (models.build_base: Llama-style, 4 layers, fp32, heads = H/64, square
q/k/v/o), batch 2 x 64 tokens per rank, AdamW:
    lora-ddp    lorakit.attach(LoraConfig(r=8, alpha=16, all-linear, dropout 0)), DistributedDataParallel + hook
    full-ddp    every weight trainable, DistributedDataParallel + hook
    lora-fsdp   the LoRA model sharded with lorakit.distributed.fsdp.shard_model (FSDP2), no DDP hook
One untimed warm-up step, then `--steps` timed steps (median). The seed formula: a d x d weight's gradient over its
rank-r adapter's is d^2 / (2 r d) = d / 2r.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from models import intermediate_size

HERE = Path(__file__).resolve().parent
MODES = ("lora-ddp", "full-ddp", "lora-fsdp")
R, ALPHA, BATCH, SEQ = 8, 16, 2, 64


def _child(mode: str, hidden: int, steps: int, out: Path) -> None:
    """One rank of one mode: build, wrap, warm up, time `steps` steps, rank 0 writes JSON."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(HERE))
    import models

    models.ensure_lorakit_importable()
    import lorakit
    from lorakit.distributed.comm import full_finetune_bytes, install_byte_counter, trainable_bytes
    from lorakit.distributed.fsdp import local_bytes, shard_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = models.build_base(hidden).train()
    full_bytes = full_finetune_bytes(model)
    if mode != "full-ddp":
        lorakit.attach(model, lorakit.LoraConfig(r=R, alpha=ALPHA, target_modules="all-linear", dropout=0.0))
    counter, wrapped = None, model
    if mode == "lora-fsdp":
        shard_model(model)
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        counter = install_byte_counter(wrapped)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(rank)
    times = []
    for step in range(steps + 1):
        ids = torch.randint(0, models.VOCAB, (BATCH, SEQ), generator=gen)
        dist.barrier()
        start = time.perf_counter()
        wrapped(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    held = local_bytes(model)
    report = {"held": held, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "step_s": statistics.median(times)}
    reports: list = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        out.write_text(json.dumps({
            "mode": mode, "world": world, "hidden": hidden, "ranks": reports, "full_bytes": full_bytes,
            "trainable_bytes": trainable_bytes(model) if mode != "lora-fsdp" else None,
            "bytes_per_step": counter.bytes_per_step if counter else None,
            "synced_steps": counter.steps if counter else None,
        }))
    dist.destroy_process_group()


def _launch(mode: str, hidden: int, steps: int, out: Path, port: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), __file__, "--child", mode, "--hidden", str(hidden), "--steps", str(steps),
           "--json", str(out)]
    subprocess.run(cmd, env=env, check=True, timeout=600)
    return json.loads(out.read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def render(results: dict[str, dict], meta: dict, command: str) -> str:
    """The markdown report: bytes per step, ratios, step times, memory per rank."""
    lora, full, fsdp = results["lora-ddp"], results["full-ddp"], results["lora-fsdp"]
    hidden = lora["hidden"]
    inter = intermediate_size(hidden)
    measured = full["bytes_per_step"] / lora["bytes_per_step"]
    lines = [
        "# DDP / FSDP on the CPU: bytes all-reduced per step and memory per rank",
        "",
        f"Command: `{command}`  ",
        f"Date: {meta['date']}; machine: {meta['cpu']}, {meta['cpus']} logical CPUs; 2 torchrun processes, gloo, "
        f"OMP_NUM_THREADS=1; torch {meta['torch']}, transformers {meta['transformers']}, lorakit {meta['commit']}; "
        f"load average (1 min) {meta['load_start']:.1f} at the start, {meta['load_end']:.1f} at the end (step times "
        "are noisy on a shared machine; the byte counts are exact)  ",
        f"Model: benchmarks/models.build_base(hidden={hidden}) (Llama-style, 4 layers, fp32, "
        f"{_mb(full['full_bytes'])} MiB of weights); batch {BATCH} x {SEQ} tokens per rank; AdamW; median of the "
        "timed steps after one warm-up.",
        "",
        "| run | bytes all-reduced per step (hook) | trainable bytes | step time (s) |",
        "|---|---:|---:|---:|",
    ]
    for name, res in (("LoRA r=8, DDP", lora), ("full fine-tuning, DDP", full)):
        step = max(r["step_s"] for r in res["ranks"])
        lines.append(f"| {name} | {res['bytes_per_step']:,} | {res['trainable_bytes']:,} | {step:.3f} |")
    lines += [
        "",
        f"Measured ratio full / LoRA (whole model, embeddings and head included in full): **{measured:,.1f}x**.  ",
        f"Seed formula per square layer, d^2 / (2 r d) = d / 2r with d = {hidden}, r = {R}: "
        f"**{hidden / (2 * R):,.1f}x** (q/k/v/o here; for the MLP's d x k weights, "
        f"d k / (r (d + k)) = {hidden * inter / (R * (hidden + inter)):,.1f}x at k = {inter}).",
        "",
        "Memory per rank (parameters this rank holds; peak RSS of the process):",
        "",
        "| run | rank | frozen base held (MiB) | trainable held (MiB) | peak RSS (MiB) | step time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, res in (("LoRA r=8, DDP", lora), ("LoRA r=8, FSDP2 (shard_model)", fsdp)):
        for rank, r in enumerate(res["ranks"]):
            lines.append(f"| {name} | {rank} | {_mb(r['held']['frozen'])} | {_mb(r['held']['trainable'])} | "
                         f"{_mb(r['peak_rss'])} | {r['step_s']:.3f} |")
    ratio = fsdp["ranks"][0]["held"]["frozen"] / lora["ranks"][0]["held"]["frozen"]
    lines += ["", f"FSDP2 frozen base per rank / DDP's: {ratio:.3f} (1/N = {1 / fsdp['world']:.3f}). Peak RSS "
              "includes torch, transformers and the model built whole before sharding.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-ddp.md")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.hidden, args.steps, args.json)
        return
    import datetime as dt

    from environment import _git, _version, cpu_model

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results = {m: _launch(m, args.hidden, args.steps, Path(tmp) / f"{m}.json", _free_port()) for m in MODES}
    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_model(),
            "cpus": os.cpu_count(), "torch": _version("torch"), "transformers": _version("transformers"),
            "commit": _git("rev-parse", "--short", "HEAD") or "unknown", "load_start": load_start,
            "load_end": os.getloadavg()[0]}
    command = f"python benchmarks/bench_ddp.py --hidden {args.hidden} --steps {args.steps}"
    text = render(results, meta, command)
    sys.path.insert(0, str(HERE.parent / "src"))
    from lorakit.io.files import atomic_write

    atomic_write(args.out.parent, {args.out.name: lambda path: path.write_text(text)})
    print(text)


if __name__ == "__main__":
    main()
