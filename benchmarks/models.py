"""Builders for the benchmark contestants: base model, FLOOR, lorakit and PEFT.

What is measured with these models lives in ``run.py``; this file only decides *what* each
contestant is, so every benchmark builds them the same way:

* base    -- a Llama-style ``LlamaForCausalLM`` built from a ``LlamaConfig`` (no hub access),
             fp32, fixed seed, 4 layers, heads = H/64, vocab 2048, ``use_cache=False``.
* floor   -- the base with every weight frozen and no adapter; a forward hook on the input
             embeddings makes their output require grad so that backward runs and computes
             activation gradients only.  This is the physical floor of any LoRA training step.
* lorakit -- ``lorakit.attach(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear",
             dropout=p))``, after ``lorakit.tune_cpu_allocator()`` (glibc's malloc thresholds fixed for the
             child process, as ``lorakit train`` does; attach itself leaves malloc alone).
* peft    -- ``peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32,
             target_modules="all-linear", lora_dropout=p))``.

Heavy libraries are imported lazily so that a child process only loads what its contestant needs
(the floor child never imports peft or lorakit).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CONTESTANTS: tuple[str, ...] = ("floor", "lorakit", "peft")
VOCAB = 2048
N_LAYERS = 4
LORA_R = 16
LORA_ALPHA = 32
SEED = 0


def intermediate_size(hidden: int) -> int:
    """~2.75 * hidden, rounded to a multiple of 64 (at least 64)."""
    return max(64, int(round(2.75 * hidden / 64)) * 64)


def ensure_lorakit_importable() -> None:
    """Put the checkout's ``src`` first on sys.path so the working tree is what gets measured."""
    src = str(REPO_ROOT / "src")
    if src not in sys.path:
        sys.path.insert(0, src)


def build_base(hidden: int, max_positions: int = 512) -> torch.nn.Module:
    """A freshly initialised Llama-style causal LM in fp32 (same seed => same weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % 64:
        raise ValueError(f"hidden must be a multiple of 64, got {hidden}")
    heads = hidden // 64
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate_size(hidden),
        num_hidden_layers=N_LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=VOCAB,
        max_position_embeddings=max(256, max_positions),
        use_cache=False,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    return model


def make_inputs(batch: int, seq: int) -> torch.Tensor:
    """Deterministic random token ids of shape (batch, seq)."""
    import torch

    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, VOCAB, (batch, seq), generator=gen)


def _freeze(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _make_input_require_grad(module: Any, inputs: Any, output: Any) -> Any:
    output.requires_grad_(True)
    return output


def make_floor(model: torch.nn.Module) -> torch.nn.Module:
    """Freeze everything and hook the input embeddings so that backward still runs."""
    _freeze(model)
    model.get_input_embeddings().register_forward_hook(_make_input_require_grad)
    return model


# variant -> extra LoraConfig fields (lorakit) / peft.LoraConfig fields (PEFT); "" is plain LoRA
LORAKIT_VARIANTS: dict[str, dict[str, Any]] = {"": {}, "dora": {"use_dora": True}, "fa": {"lora_fa": True}}
PEFT_VARIANTS: dict[str, dict[str, Any]] = {"": {}, "dora": {"use_dora": True}}


def attach_lorakit(model: torch.nn.Module, dropout: float, variant: str = "") -> torch.nn.Module:
    """Attach lorakit LoRA (r=16, alpha=32, all linear layers except the LM head), or a variant of it."""
    ensure_lorakit_importable()
    import lorakit

    lorakit.tune_cpu_allocator()  # what lorakit's own trainer does for a CPU run (docs/cpu-internals.md)
    extra = LORAKIT_VARIANTS[variant]
    cfg = lorakit.LoraConfig(r=LORA_R, alpha=LORA_ALPHA, target_modules="all-linear", dropout=dropout, **extra)
    returned = lorakit.attach(model, cfg)
    # attach() may work in place (returning None or a handle) or return the wrapped model.
    import torch

    return returned if isinstance(returned, torch.nn.Module) else model


def attach_peft(model: torch.nn.Module, dropout: float, variant: str = "") -> torch.nn.Module:
    """Wrap with PEFT LoRA (r=16, lora_alpha=32, target_modules="all-linear"), or a variant of it."""
    import peft

    extra = PEFT_VARIANTS[variant]
    cfg = peft.LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear", lora_dropout=dropout, **extra
    )
    return peft.get_peft_model(model, cfg)


def build_contestant(name: str, hidden: int, dropout: float, max_positions: int = 512) -> torch.nn.Module:
    """Build ``name`` ('base', 'floor', 'lorakit', 'peft', or 'lorakit:<variant>' / 'peft:<variant>', e.g.
    'peft:dora') on a fresh base model."""
    model = build_base(hidden, max_positions)
    library, _, variant = name.partition(":")
    if name == "base":
        return model
    if name == "floor":
        return make_floor(model)
    if library == "lorakit" and variant in LORAKIT_VARIANTS:
        return attach_lorakit(model, dropout, variant)
    if library == "peft" and variant in PEFT_VARIANTS:
        return attach_peft(model, dropout, variant)
    raise ValueError(f"unknown contestant {name!r}")


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- merge / save / load


def merge(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapter into the base weights and remove the LoRA modules; returns the plain model."""
    if name == "peft":
        return model.merge_and_unload()  # type: ignore[operator]
    ensure_lorakit_importable()
    import lorakit

    return lorakit.merge_and_unload(model)


def save(name: str, model: torch.nn.Module, directory: str) -> None:
    if name == "peft":
        model.save_pretrained(directory)  # type: ignore[operator]
        return
    ensure_lorakit_importable()
    import lorakit

    lorakit.save_adapter(model, directory)


def load(name: str, base: torch.nn.Module, directory: str) -> torch.nn.Module:
    """Load a saved adapter onto a fresh base model; returns the adapted model."""
    if name == "peft":
        from peft import PeftModel

        return PeftModel.from_pretrained(base, directory)
    ensure_lorakit_importable()
    import lorakit

    return lorakit.load_adapter(base, directory)


def dir_size_bytes(directory: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(directory):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def weight_file_bytes(directory: str) -> int:
    """Bytes of the tensor files only (safetensors / bin), excluding JSON configs."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for f in files:
            if f.endswith((".safetensors", ".bin", ".pt", ".pth")):
                total += os.path.getsize(os.path.join(root, f))
    return total
