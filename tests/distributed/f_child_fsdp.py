"""torchrun child: lorakit.attach, then FSDP2 sharding of the frozen base (shard_model), a few steps of a user's
own loop, the adapter saved from rank 0 (gathered adapter tensors only)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's tiny models
from f_launch import LR, PER_RANK, f_lora_config, global_batch, rank_rows  # noqa: E402

import lorakit  # noqa: E402
from conftest import tiny_llama  # noqa: E402
from lorakit.distributed.fsdp import local_bytes, save_adapter_sharded, shard_model  # noqa: E402

out, steps = Path(sys.argv[1]), int(sys.argv[2])
SAVED = ["lm_head"]  # a modules_to_save copy trains in full beside the adapters
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model = lorakit.attach(tiny_llama().train(), f_lora_config(SAVED))
unsharded = local_bytes(model)
shard_model(model)
sharded = local_bytes(model)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
losses = []
for step in range(steps):
    ids = rank_rows(global_batch(step, PER_RANK * world), rank, world)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    losses.append(mean.item() / world)
save_adapter_sharded(model, out / "adapter")
per_rank = [None] * world
dist.all_gather_object(per_rank, sharded)
if rank == 0:
    (out / "result.json").write_text(json.dumps({
        "losses": losses, "unsharded": unsharded, "sharded_per_rank": per_rank, "world": world,
    }))
dist.destroy_process_group()
