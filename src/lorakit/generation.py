"""Text generation with adapters on a local Hugging Face model: prompts (plain or chat template), greedy or
sampled decoding that streams the new text, and batches of prompts from a file.

    generate(model, tokenizer, prompt, ...) -> str        streams the new text while it is produced
    generate_all(model_dir, adapter_dirs, prompts, ...)   the `lorakit generate` command's work
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from .checks import check_seed
from .errors import AdapterFileError, ConfigError, DataError
from .hf import check_model_dir, load_adapters, load_model_dir, model_dir_task, resolve_device
from .loading.hub import resolve_model


# -- generation ------------------------------------------------------------------------------------------
def _make_streamer(tokenizer: Any, stream: TextIO | None, pieces: list[str]) -> Any:
    """A transformers TextStreamer that writes each finished piece of new text to `stream` (flushed) and
    collects it in `pieces`."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                pieces.append(text)
                if stream is not None:
                    stream.write(text)
                    stream.flush()

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def build_prompt(tokenizer: Any, prompt: str, chat: bool = False) -> dict[str, torch.Tensor]:
    """The model inputs (input_ids, attention_mask; batch of 1) for `prompt`; with `chat`, the prompt is one
    user message in the tokenizer's chat template, followed by the generation prompt.

    Raises:
        ConfigError: `chat` with a tokenizer that has no chat template.
    """
    if not isinstance(prompt, str):
        raise ConfigError(f"a prompt must be a string, got {type(prompt).__name__}")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--chat: this tokenizer has no chat template (tokenizer_config.json chat_template)")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        encoded = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    else:
        encoded = tokenizer(prompt, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def check_generation_options(max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                             seed: int | None = None) -> None:
    """Raise ConfigError for max_new_tokens < 1, a temperature that is negative or not finite, top_p outside
    (0, 1], or a seed outside [0, 2**32 - 1]."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or temperature < 0:
        raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None:
        check_seed(seed, "seed")


def check_context(model: nn.Module, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a generation longer than the model's context (config.max_position_embeddings, GPT-2's n_positions):
    past it, absolute position embeddings index out of range and rotary ones produce text the model never saw.

    Raises:
        ConfigError: prompt_tokens + max_new_tokens > the context (both named).
    """
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and prompt_tokens + max_new_tokens > context:
        raise ConfigError(f"max_new_tokens {max_new_tokens} plus the prompt's {prompt_tokens} tokens exceed the "
                          f"model's context of {context} positions (config max_position_embeddings); give "
                          f"--max-new-tokens {max(context - prompt_tokens, 0)} or less")


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = False,
    stream: TextIO | None = None,
) -> str:
    """Generate a continuation of `prompt`, writing the new text to `stream` piece by piece as it is produced
    (transformers' TextStreamer: whole words at a time); return the new text.

    temperature 0 is greedy decoding (deterministic); > 0 samples from softmax(logits / temperature),
    restricted to the smallest set of tokens whose probability reaches `top_p` (nucleus sampling; no top-k).
    `seed` seeds torch before this prompt, so a sampled output is reproducible.

    Raises:
        ConfigError: max_new_tokens < 1, temperature < 0 or not finite, top_p outside (0, 1], a seed outside
            [0, 2**32 - 1], a generation longer than the model's context, --chat without a template.
    """
    from transformers import GenerationConfig

    check_generation_options(max_new_tokens, temperature, top_p, seed)
    inputs = build_prompt(tokenizer, prompt, chat)
    check_context(model, inputs["input_ids"].shape[-1], max_new_tokens)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    base_gen = getattr(model, "generation_config", None)
    eos = getattr(base_gen, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "eos_token_id": eos, "pad_token_id": pad}
    if temperature > 0:
        settings.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        settings.update(do_sample=False)
    gen_config = GenerationConfig(**settings)
    if seed is not None:
        torch.manual_seed(seed)
    pieces: list[str] = []
    streamer = _make_streamer(tokenizer, stream, pieces)
    with torch.inference_mode():
        model.generate(**inputs, generation_config=gen_config, streamer=streamer)
    return "".join(pieces)


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a JSONL file: one JSON object per non-empty line, with a string field "prompt".

    Raises:
        DataError: a missing file, a directory, text that is not UTF-8, a line that is not JSON, or an object
            without a string "prompt" (the message names the line).
    """
    file = Path(path)
    if file.is_dir():
        raise DataError(f"prompts file {file} is a directory; expected a JSONL file")
    if not file.is_file():
        raise DataError(f"prompts file {file} does not exist")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = file.read_bytes()[:err.start].count(b"\n") + 1
        raise DataError(f"{file}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{file}:{number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise DataError(f'{file}:{number}: expected an object with a string "prompt" field')
        prompts.append(record["prompt"])
    if not prompts:
        raise DataError(f"prompts file {file} has no prompts")
    return prompts


def generate_all(
    model_dir: str | Path,
    prompts: Iterable[str],
    adapter_dirs: Sequence[str | Path] = (),
    device: str | None = None,
    stream: TextIO | None = None,
    dtype: str | None = "auto",
    quantize: str | None = None,
    **options: Any,
) -> list[str]:
    """Load the model (and adapters, all active), then generate() for each prompt, streaming to `stream`
    (default: standard output) with a newline after each completion. `options` go to generate().

    Raises:
        ModelDirError / AdapterFileError: bad directories. ConfigError: a model that is not a causal LM.
    """
    stream = sys.stdout if stream is None else stream
    prompts = list(prompts)
    check_generation_options(**{k: v for k, v in options.items()
                                if k in ("max_new_tokens", "temperature", "top_p", "seed")})
    model_dir = check_model_dir(resolve_model(model_dir))
    for adapter_dir in adapter_dirs:  # fail before the (slow) model load
        if not Path(adapter_dir).is_dir():
            state = "is a file, not a directory" if Path(adapter_dir).exists() else "does not exist"
            raise AdapterFileError(f"adapter directory {adapter_dir} {state}")
    declared = model_dir_task(model_dir)
    if declared not in (None, "causal-lm"):
        raise ConfigError(f"model directory {model_dir}: generate needs a causal LM, config.json declares a {declared} model")
    model, tokenizer = load_model_dir(model_dir, task="causal-lm", device=resolve_device(device), dtype=dtype,
                                      quantize=quantize)
    load_adapters(model, adapter_dirs)
    model.eval()
    outputs = []
    for prompt in prompts:
        outputs.append(generate(model, tokenizer, prompt, stream=stream, **options))
        stream.write("\n")
        stream.flush()
    return outputs
