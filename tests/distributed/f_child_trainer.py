"""torchrun child: transformers' Trainer (DDP on gloo, CPU) trains a model with lorakit adapters and saves the
adapter with save_model (lorakit's save_pretrained), which Trainer calls on its main process only."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's tiny models
from f_launch import f_lora_config, global_batch  # noqa: E402

import lorakit  # noqa: E402
from conftest import Counting, tiny_llama  # noqa: E402

out = Path(sys.argv[1])
model = lorakit.attach(tiny_llama().train(), f_lora_config())
save_pretrained = model.save_pretrained


def recording_save_pretrained(*args, **kwargs):
    """lorakit's save_pretrained, leaving a mark of which rank called it."""
    (out / f"saved_by_rank{dist.get_rank()}").write_text("1")
    return save_pretrained(*args, **kwargs)


model.save_pretrained = recording_save_pretrained
args = TrainingArguments(
    output_dir=str(out / "trainer"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
    lr_scheduler_type="constant", report_to=[], use_cpu=True, ddp_backend="gloo", disable_tqdm=True,
    save_strategy="no", seed=0, dataloader_num_workers=0,
)
trainer = Trainer(model=model, args=args, train_dataset=Counting())
trainer.train()
trainer.save_model(str(out / "adapter"))
rank = dist.get_rank()
adapter = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
gathered = [torch.zeros_like(adapter) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, adapter)
if rank == 0:
    model.eval()
    with torch.no_grad():
        torch.save(model(global_batch(99, 3)).logits, out / "logits.pt")
    (out / "result.json").write_text(json.dumps({
        "world": dist.get_world_size(), "backend": dist.get_backend(), "args_world": args.world_size,
        "ranks_agree": all(torch.equal(g, gathered[0]) for g in gathered),
        "ddp_wrapped": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
    }))
dist.barrier()
