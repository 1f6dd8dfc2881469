"""A model's shapes for `lorakit plan`, read from its config alone: the model is built on the meta device (no
memory, no weights read), lorakit.targeting picks the adapted modules, lorakit.layer_kinds gives each adapter's
A and B shapes, and the linears NF4 would store are those lorakit.load_model quantises.

    plan_model("org/name", r=8, target_modules=["q_proj", "v_proj"], dtype="bf16", quantize="nf4")  -> Plan
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import ConfigError, ModelDirError
from ..layer_kinds import kind_of
from ..loading.hub import _from_cache, hub_cache_dir, hub_offline, parse_model_id, resolve_model
from ..loading.options import HEAD_NAMES, checkpoint_dtype, normalize_task, one_line, task_from_config
from ..targeting import find_targets, output_head_names
from .plan import Architecture, ModelShapes, Plan, make_plan

GATE_NAMES = ("gate_proj", "gate_up_proj")  # a gated (SwiGLU-style) MLP has one of these
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def read_config(name_or_path: str | Path) -> tuple[Any, Path]:
    """The transformers config of a model directory or model ID, and the directory config.json is in. A model
    ID missing from the Hugging Face cache is fetched as config.json alone (never its weights).

    Raises:
        ModelDirError: no such directory or ID, no config.json, or one transformers cannot read.
    """
    import transformers

    directory = _config_dir(name_or_path)
    if not (directory / "config.json").is_file():
        raise ModelDirError(f"--model {name_or_path}: {directory} has no config.json: not a Hugging Face model")
    try:
        return transformers.AutoConfig.from_pretrained(directory, local_files_only=True), directory
    except Exception as err:  # noqa: BLE001 - any failure becomes one clear line
        raise ModelDirError(f"--model {name_or_path}: config.json could not be read: {one_line(err)}") from err


def _config_dir(name_or_path: str | Path) -> Path:
    if Path(name_or_path).expanduser().exists() or parse_model_id(str(name_or_path)) is None:
        return resolve_model(name_or_path)  # a directory, or resolve_model's error for a path that is not there
    model_id = parse_model_id(str(name_or_path))
    assert model_id is not None
    cached = _from_cache(model_id, hub_cache_dir())
    if cached is not None or hub_offline():
        return cached if cached is not None else resolve_model(name_or_path)  # the latter: the offline error
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(model_id.repo_id, "config.json", revision=model_id.revision,
                                    cache_dir=hub_cache_dir())).parent
    except Exception as err:  # noqa: BLE001 - network, auth, missing repo: one clear line
        raise ModelDirError(f"--model {name_or_path}: not a local directory, and its config.json could not be "
                            f"downloaded ({type(err).__name__}: {one_line(err)[:300]})") from err


def meta_model(config: Any, task: str | None = None) -> nn.Module:
    """The model of `config` with every parameter and buffer on the meta device (costs no memory).

    Raises:
        ConfigError: an unknown task, or a config transformers cannot build a causal LM / classifier from.
    """
    import transformers

    task = normalize_task(task) or task_from_config(config) or "causal-lm"
    auto = (transformers.AutoModelForSequenceClassification if task == "classification"
            else transformers.AutoModelForCausalLM)
    try:
        with torch.device("meta"):
            model = auto.from_config(config)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"--model: cannot build a {task} model from its config ({type(config).__name__}): "
                          f"{one_line(err)}") from err
    with contextlib.suppress(AttributeError, TypeError):
        model.tie_weights()
    return model


def architecture(config: Any, model: nn.Module) -> Architecture:
    """The dimensions the activation estimate needs, from the config (its text part for a multimodal one).

    Raises:
        ConfigError: the config lacks hidden_size, num_hidden_layers, num_attention_heads or vocab_size.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found: dict[str, int] = {}
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        value = getattr(text, name, None)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--model: its config ({type(text).__name__}) has no {name}: lorakit plan reads "
                              f"decoder-style transformer configs")
        found[name] = value
    hidden, heads = found["hidden_size"], found["num_attention_heads"]
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    leaves = {path.rsplit(".", 1)[-1] for path, _ in model.named_modules()}
    attention = getattr(getattr(model, "config", config), "_attn_implementation", None)
    return Architecture(layers=found["num_hidden_layers"], hidden=hidden, q_dim=heads * head_dim,
                        kv_dim=kv_heads * head_dim, intermediate=intermediate, heads=heads,
                        vocab=found["vocab_size"], gated_mlp=any(n in leaves for n in GATE_NAMES),
                        stores_scores=attention == "eager")


def quantizable_weights(model: nn.Module) -> frozenset[str]:
    """Names of the weights --quantize nf4 stores in NF4: every nn.Linear's weight but the output head's and a
    classification head's (as lorakit.load_model picks them)."""
    heads = output_head_names(model)
    return frozenset(f"{path}.weight" for path, module in model.named_modules()
                     if isinstance(module, nn.Linear) and path not in heads
                     and path.rpartition(".")[2] not in HEAD_NAMES
                     and not isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear))


def adapter_params(module: nn.Module, r: int) -> tuple[int, int]:
    """(parameters of a rank-r adapter on `module`, its input features): the sizes of A and B as its layer kind
    shapes them."""
    kind = kind_of(module)
    assert kind is not None, "find_targets returns supported modules only"
    shape_a, shape_b = kind.shapes(module, r)
    return math.prod(shape_a) + math.prod(shape_b), kind.dims(module)[0]


def linear_inputs(model: nn.Module) -> tuple[tuple[str, int], ...]:
    """(path, input features) of every linear layer (nn.Linear, GPT-2's Conv1D): what full fine-tuning keeps."""
    found = []
    for path, module in model.named_modules():
        kind = kind_of(module)
        if kind is not None and kind.is_linear:
            found.append((path, kind.dims(module)[0]))
    return tuple(found)


def model_shapes(config: Any, *, r: int, target_modules: list[str] | str, task: str | None = None,
                 name: str = "") -> ModelShapes:
    """A plan's view of the model `config` describes, built on the meta device, with rank-r adapters on the
    modules `target_modules` selects (names, dotted suffixes, a full-match regex or "all-linear").

    Raises:
        ConfigError: a bad rank or target spec, or a config that cannot be built.
        TargetError: no module matches (the message lists the closest names).
    """
    lora = LoraConfig(r=r, target_modules=target_modules)
    model = meta_model(config, task)
    adapted = tuple((path, *adapter_params(model.get_submodule(path), r)) for path in find_targets(model, lora))
    params = {n: p.numel() for n, p in model.named_parameters()}  # tied parameters once
    arch = architecture(config, model)
    if (normalize_task(task) or task_from_config(config)) == "classification":  # the head's outputs are labels
        arch = dataclasses.replace(arch, vocab=int(getattr(config, "num_labels", 2) or 2))
    return ModelShapes(name=name or type(config).__name__, params=params,
                       quantizable=quantizable_weights(model) & params.keys(), adapted=adapted,
                       architecture=arch, linears=linear_inputs(model))


def plan_model(name_or_path: str | Path, *, r: int, target_modules: list[str] | str, dtype: str = "auto",
               quantize: str | None = None, batch: int = 8, seq_len: int = 512, tasks: int = 100,
               world_size: int | None = None, task: str | None = None) -> Plan:
    """The Plan of a model directory or model ID, read from its config.json only (weights never loaded).
    dtype "auto": the checkpoint's own (config.json's dtype, else its safetensors header, else fp32).

    Raises:
        ModelDirError: no such model, or an unreadable config.json.
        ConfigError / TargetError: as model_shapes and make_plan.
    """
    config, directory = read_config(name_or_path)
    if dtype == "auto":
        dtype = DTYPE_NAMES.get(checkpoint_dtype(directory), "fp32")
    shapes = model_shapes(config, r=r, target_modules=target_modules, task=task, name=str(name_or_path))
    return make_plan(shapes, r=r, target_modules=target_modules, dtype=dtype, quantize=quantize, batch=batch,
                     seq_len=seq_len, tasks=tasks, world_size=world_size)
