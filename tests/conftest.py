"""Shared tiny-model builders for lorakit's tests (no hub access: every model is built from a config).

Everything here is deliberately small (hidden 32, 1-2 layers, vocab 64) so the whole suite runs in well
under a few minutes on two CPU cores.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

# Tiny models: one thread is fastest and immune to OpenMP oversubscription on a busy 2-core machine.
torch.set_num_threads(1)

VOCAB = 64
HIDDEN = 32


class Counting(torch.utils.data.Dataset):
    """Sequences start, start+1, ... (mod VOCAB); labels = input_ids."""

    def __init__(self, size: int = 32, length: int = 12) -> None:
        starts = torch.randint(0, VOCAB, (size, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (starts + torch.arange(length)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama(hidden: int = HIDDEN, layers: int = 2, attention_bias: bool = False) -> nn.Module:
    """A tiny LlamaForCausalLM (untied lm_head), fixed seed, eval mode."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=attention_bias,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(hidden: int = HIDDEN, layers: int = 2) -> nn.Module:
    """A tiny GPT2LMHeadModel (Conv1D projections, lm_head tied to wte), fixed seed, eval mode."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert(hidden: int = HIDDEN, layers: int = 2, num_labels: int = 3) -> nn.Module:
    """A tiny BertForSequenceClassification (head: `classifier`), fixed seed, eval mode."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def token_ids(batch: int = 2, length: int = 7, seed: int = 1234) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)


def randomize_adapters(model: nn.Module, std: float = 0.1, seed: int = 99) -> None:
    """Give every adapter tensor (A and B, all adapters) non-zero values, as after training."""
    from lorakit.layers import LoraLayer

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for adapter in module.adapters.values():
                    for p in adapter.parameters():
                        p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * std)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture
def llama() -> nn.Module:
    return tiny_llama()


@pytest.fixture
def gpt2() -> nn.Module:
    return tiny_gpt2()


@pytest.fixture
def bert() -> nn.Module:
    return tiny_bert()


# -- tiny model directories for end-to-end (CLI / training) tests -------------------------------------------
@pytest.fixture(scope="session")
def causal_lm_dir(tmp_path_factory):
    """A tiny Llama causal LM with a word-level tokenizer (chat template included), saved to disk."""
    from model_dirs import make_causal_lm_dir

    return make_causal_lm_dir(tmp_path_factory.mktemp("causal_lm"))


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory):
    """A tiny BERT sequence classifier (2 labels) with the same tokenizer, saved to disk."""
    from model_dirs import make_classifier_dir

    return make_classifier_dir(tmp_path_factory.mktemp("classifier"))


@pytest.fixture(autouse=True)
def _token_cache_in_tmp(tmp_path_factory, monkeypatch):
    """The token cache (lorakit.train.cache) goes to a temporary directory, never to the user's ~/.cache."""
    monkeypatch.setenv("LORAKIT_DATA_CACHE", str(tmp_path_factory.mktemp("token-cache")))
