"""The quickstart: lorakit's whole loop on a small Llama built from a config, in about a minute on a CPU.

attach LoRA -> train a few hundred steps on a generated task (the loss falls) -> save in PEFT's format ->
reload into a fresh base (same outputs) -> merge into the weights (same outputs) -> a plain model again.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from . import model as M
from .checks import check_seed
from .config import LoraConfig
from .errors import ConfigError
from .io import load_adapter, save_adapter

VOCAB = 32  # token ids 0..31
SEQ = 24


def make_base_model(seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama with hidden size 128, random weights (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def make_batch(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Arithmetic progressions mod VOCAB: token t+1 = token t + step, step in 1..4.

    After two tokens the rest of each sequence is determined: a model that learns the rule drives the
    loss towards zero; one that does not stays near ln(VOCAB) = 3.47.
    """
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    step = torch.randint(1, 5, (batch, 1), generator=generator)
    return (start + step * torch.arange(SEQ)) % VOCAB  # (batch, SEQ)


def run(out_dir: str | Path = "runs/quickstart", steps: int = 300, seed: int = 0, log_every: int = 25) -> dict:
    """Run the quickstart; print each stage and return the measured numbers.

    Raises:
        ConfigError: steps or log_every < 1, a seed outside [0, 2**32 - 1], or an out_dir that is a file
            (all before any work starts).
    """
    out_dir = Path(out_dir)
    for name, value in (("steps", steps), ("log_every", log_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"quickstart: {name} must be a positive integer; got {value!r}")
    check_seed(seed, "quickstart: seed")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"quickstart: out_dir {out_dir} exists and is not a directory")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = make_base_model(seed)
    original = copy.deepcopy(model)
    config = LoraConfig(r=8, alpha=16, target_modules="all-linear", dropout=0.0)
    M.attach(model, config)
    trainable, total = M.trainable_parameters(model)
    print(f"attached LoRA r=8 to all linear layers: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.2f}%)")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 - i / steps)  # linear decay
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    first_loss = float("nan")
    recent: list[float] = []  # the last `log_every` losses, averaged for the printout
    for step in range(1, steps + 1):
        ids = make_batch(16, generator)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-log_every:]
        if step == 1:
            first_loss = recent[-1]
        if step % log_every == 0 or step == 1:
            print(f"step {step:4d}  loss {sum(recent) / len(recent):.4f}")
    last_loss = sum(recent) / len(recent)
    seconds = time.perf_counter() - start
    print(f"trained {steps} steps in {seconds:.1f}s: loss {first_loss:.3f} -> {last_loss:.3f} "
          f"(mean of the last {len(recent)} steps)")

    model.eval()
    probe = make_batch(8, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        adapted = model(input_ids=probe).logits
    adapter_path = save_adapter(model, out_dir / "adapter")
    files = sorted(p.name for p in adapter_path.iterdir())
    print(f"saved the adapter in PEFT's format to {adapter_path}: {', '.join(files)}")

    reloaded = load_adapter(copy.deepcopy(original), adapter_path)
    with torch.no_grad():
        reload_diff = (reloaded(input_ids=probe).logits - adapted).abs().max().item()
    print(f"reloaded into a fresh base model: max |logit difference| = {reload_diff:.2e}")

    merged = M.merge_and_unload(model)
    with torch.no_grad():
        merge_diff = (merged(input_ids=probe).logits - adapted).abs().max().item()
    plain = all(type(a) is type(b) for a, b in zip(merged.modules(), original.modules()))
    print(f"merged into the weights: max |logit difference| = {merge_diff:.2e}; "
          f"module types restored: {plain}")
    ok = last_loss < 0.6 * first_loss and reload_diff <= 1e-4 and merge_diff <= 1e-4 and plain
    print("quickstart " + ("OK" if ok else "FAILED"))
    return {"trainable": trainable, "total": total, "first_loss": first_loss, "last_loss": last_loss,
            "reload_diff": reload_diff, "merge_diff": merge_diff, "ok": ok, "seconds": seconds}
