"""torchrun child: a user's own loop, lorakit.attach + DistributedDataParallel + the counting comm hook."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's tiny models
from f_launch import global_batch, rank_rows  # noqa: E402

import lorakit  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from lorakit.distributed.comm import full_finetune_bytes, install_byte_counter, trainable_bytes  # noqa: E402

out, steps, per_rank = Path(sys.argv[1]), int(sys.argv[2]), 2
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model = lorakit.attach(tiny_llama(), lorakit.LoraConfig(r=4, target_modules="all-linear", dropout=0.0))
ddp = torch.nn.parallel.DistributedDataParallel(model)
counter = install_byte_counter(ddp)
try:
    install_byte_counter(ddp)
    second_hook = "accepted"
except lorakit.LorakitError as err:
    second_hook = f"{type(err).__name__}: {err}"
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
bytes_per_step, losses = [], []
for step in range(steps):
    ids = rank_rows(global_batch(step, per_rank * world), rank, world)
    loss = ddp(input_ids=ids, labels=ids).loss
    loss.backward()
    if step == 0:
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        torch.save(grads, out / f"grads_rank{rank}.pt")
    opt.step()
    opt.zero_grad()
    bytes_per_step.append(counter.bytes_per_step)
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    losses.append(mean.item() / world)  # the loss of the whole batch (equal-sized halves)
trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
# gradient accumulation: two micro-batches, the first under no_sync, synchronise once
synced_before, ids = counter.steps, rank_rows(global_batch(steps, per_rank * world), rank, world)
with ddp.no_sync():
    ddp(input_ids=ids, labels=ids).loss.backward()
after_no_sync = counter.steps
ddp(input_ids=ids, labels=ids).loss.backward()
torch.save(trained, out / f"trained_rank{rank}.pt")
if rank == 0:
    (out / "result.json").write_text(json.dumps({
        "bytes_per_step": bytes_per_step, "trainable_bytes": trainable_bytes(model),
        "full_bytes": full_finetune_bytes(model), "steps": counter.steps, "synced_before": synced_before,
        "after_no_sync": after_no_sync, "world": world, "losses": losses, "second_hook": second_hook,
    }))
dist.destroy_process_group()
