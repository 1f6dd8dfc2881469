"""Weighted combinations of a model's adapters: a new adapter (`combine`), the combination merged straight into
the base weights (`merge_combination`), and directories in / a PEFT-format directory out (`combine_dirs`).

    combine(model, {"a": 0.7, "b": -0.3}, name="ab")          ΔW_ab = 0.7 ΔW_a - 0.3 ΔW_b, exactly (rank r_a + r_b)
    combine(model, {...}, "ab", method="ties", density=0.5, rank=8)   merged deltas, factorised by SVD to rank 8

A module that one adapter does not adapt counts as a zero delta for that adapter. The math is in ops.combine.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import model as M
from .config import LoraConfig
from .errors import AdapterFileError, AdapterNameError, ConfigError, LorakitError, MergeError
from .layers import LoraLayer
from .names import check_adapter_name, check_out_not_input
from .ops.combine import (
    DENSITY_METHODS,
    METHODS,
    check_density,
    combine_deltas,
    energy_share,
    linear_factors,
    truncate_delta,
    truncate_factors,
)
from .targeting import is_target, iter_candidate_modules
from .variants import variant_named
from .variants.lora import LoraAdapter, add_into

Weights = Mapping[str, float] | Sequence[float]
_Plan = list[tuple[LoraLayer, list[tuple[LoraAdapter, float]]]]  # per layer: (input adapter, weight) present there


@torch.no_grad()
def combine(
    model: nn.Module,
    weights: Weights,
    name: str,
    method: str = "linear",
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    adapters: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Create adapter `name` on `model` holding a weighted combination of attached adapters; it becomes active.

    Args:
        weights: {adapter name: weight}, or a list of weights with `adapters` naming them (PEFT's
            add_weighted_adapter form). Negative weights subtract (task negation); {"a": t, "b": 1 - t} interpolates.
        method: "linear": exactly Σ w_i s_i B_i A_i, by concatenating the factors (rank = the sum of the ranks
            present at each module, scale 1: alpha = r). "svd": the same sum truncated by SVD to `rank`.
            "ties", "dare_linear", "dare_ties", "magnitude_prune": merge the full deltas ΔW_i (ops.combine), then
            truncate by SVD to `rank`. Default rank for the SVD methods: the largest input rank, capped per
            module at min(d, k).
        density: share of each delta kept, in (0, 1], for ties / dare_* / magnitude_prune.
        seed: seeds DARE's random drop (the same seed gives the same adapter and the same merge_combination).
        adapters: the names, when `weights` is a list.

    modules_to_save copies are combined as full tensors: copy = original + the method applied to (copy_i - original).
    Trainable biases (bias="all" / "lora_only") live in the shared base and are not part of the new adapter.

    Returns:
        A report: {"name", "method", "weights", "density", "seed", "rank": {module: r}, "energy_kept":
        {module: share}, "energy_kept_total", "modules_to_save": [paths]}; energy is Σ kept σ² / Σ σ², 1.0 for
        "linear".

    Raises:
        AdapterNameError: an unknown input adapter, or `name` already taken.
        ConfigError: bad weights (a list without `adapters` or of another length, non-finite values), an unknown
            method, a missing or bad density, a rank where it does not apply, a DoRA input with "linear" (its
            update is not B A: use "svd" or merge_combination), a PiSSA / OLoRA input.
        MergeError: an input adapter's layer has adapters merged into its weight (unmerge first).
    """
    terms = resolve_weights(model, weights, adapters)
    _check_options(method, rank, density)
    _check_new_name(model, name)
    _check_inputs(model, terms, method, making_adapter=True)
    plan = _plan(model, terms)
    generator = torch.Generator().manual_seed(int(seed))
    default_rank = rank if rank is not None else max(a.r for _, present in plan for a, _ in present)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    energy: dict[str, tuple[float, float]] = {}
    for layer, present in plan:
        lora_a, lora_b, kept, total = _combined_factors(layer, present, method, default_rank, density, generator)
        factors[layer.path] = (lora_a, lora_b)
        energy[layer.path] = (kept, total)
    saved = _combined_saved(model, terms, method, density, generator)
    config = _combined_config(model, terms, {path: a.shape[0] for path, (a, _) in factors.items()})
    M.attach_at(model, config, name, list(factors))
    with torch.no_grad():
        for layer, _ in plan:
            adapter = layer.adapters[name]
            lora_a, lora_b = factors[layer.path]
            adapter.lora_A.copy_(lora_a.view(adapter.lora_A.shape))
            adapter.lora_B.copy_(lora_b.view(adapter.lora_B.shape))
        for wrapper in M.saved_modules(model):
            if wrapper.path in saved:
                for pname, value in wrapper.copies[name].state_dict(keep_vars=True).items():
                    value.copy_(saved[wrapper.path].get(pname, value))
    return _report(name, method, terms, density, seed, {p: a.shape[0] for p, (a, _) in factors.items()},
                   energy, list(saved))


@torch.no_grad()
def merge_combination(
    model: nn.Module,
    weights: Weights,
    method: str = "linear",
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    adapters: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Add the weighted combination of adapters straight into the base weights, without creating an adapter.

    W0 += ΔW per module (fp32 arithmetic, cast to the weight's dtype), ΔW as in `combine` with the same
    arguments: with `rank` (SVD methods) the truncated update, so that the result equals `combine(...)` followed
    by merging the new adapter; with rank=None the untruncated combination. "linear" and "svd" use the deltas
    themselves, so DoRA inputs work with every method here. modules_to_save originals get the combined copies.

    The change is permanent (like merge_and_unload): nothing is recorded to undo it, and the input adapters stay
    attached and active; delete_adapter() or set_active() them before using the merged model. Reload the base
    weights to go back (negated weights undo "linear" up to rounding).

    Returns:
        The report of `combine`, with "name": None.

    Raises:
        What `combine` raises (not the DoRA / "linear" case), and MergeError for a base layer whose weight is not a
        plain parameter (a quantised layer).
    """
    terms = resolve_weights(model, weights, adapters)
    _check_options(method, rank, density)
    _check_inputs(model, terms, method, making_adapter=False)
    plan = _plan(model, terms)
    for layer, _ in plan:
        if layer.kind.quantized or not isinstance(layer.base_layer.weight, nn.Parameter):
            raise MergeError(f"module {layer.path!r}: its weight is quantised or not a plain parameter "
                             f"({type(layer.base_layer).__name__}); cannot merge a combination into it")
    generator = torch.Generator().manual_seed(int(seed))
    ranks: dict[str, int | None] = {}
    energy: dict[str, tuple[float, float]] = {}
    for layer, present in plan:  # one module at a time: no more than one full-size delta is held
        delta = combine_deltas(method, [_delta_dk(layer, a) for a, _ in present], [w for _, w in present],
                               density, generator)  # (d, k, *kernel)
        kept = total = float(delta.double().square().sum())
        if rank is not None:
            lora_a, lora_b, kept, total = truncate_delta(delta, rank)
            delta = (lora_b @ lora_a).view(delta.shape)
        add_into(layer.base_layer.weight, layer.kind.to_weight_layout(delta), 1.0)
        ranks[layer.path] = None if rank is None else min(rank, *delta.flatten(1).shape)
        energy[layer.path] = (kept, total)
    saved = _combined_saved(model, terms, method, density, generator)
    with torch.no_grad():
        for wrapper in M.saved_modules(model):
            for pname, value in wrapper.original_module.state_dict(keep_vars=True).items():
                if wrapper.path in saved and pname in saved[wrapper.path]:
                    value.copy_(saved[wrapper.path][pname])
    return _report(None, method, terms, density, seed, ranks, energy, list(saved))


def combine_dirs(
    model_dir: str | Path,
    adapters: Sequence[tuple[str, str | Path, float]],
    out: str | Path,
    method: str = "linear",
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    force: bool = False,
    dtype: str | torch.dtype | None = "auto",
    quantize: str | None = None,
) -> dict[str, Any]:
    """Load a base model (a directory or a model ID; `dtype` and `quantize` as lorakit.load_model takes them) and adapter directories, combine them and save the result in PEFT's format.

    Args:
        adapters: (label, adapter directory, weight) per input; labels name the inputs in the report.
        out: the output adapter directory (adapter_config.json + adapter_model.safetensors, written atomically).
        force: replace a non-empty `out`.

    Returns:
        combine's report, with "weights" keyed by label and "out".

    Raises:
        ConfigError: no adapters, repeated labels, a non-empty `out` without `force`, bad options, an `out` that is,
            contains or lies inside an input directory (checked before anything is loaded).
        AdapterFileError / ShapeMismatchError / ModelDirError: a missing directory, or an adapter that does not fit
            the base model (the message names the module, the expected and the found shape).
    """
    from .hf import _check_out_dir, adapter_task, load_model_dir
    from .io import load_adapter, save_adapter

    if not adapters:
        raise ConfigError("combine needs at least one adapter (label, directory, weight)")
    labels = [label for label, _, _ in adapters]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigError(f"adapter label(s) {', '.join(map(repr, repeated))} given more than once")
    _check_options(method, rank, density)
    out = Path(out)
    _check_out_dir(out, force)
    for _, directory, _ in adapters:
        if not Path(directory).is_dir():
            raise AdapterFileError(f"adapter directory {directory} does not exist")
    local_model = [("--model", model_dir)] if Path(model_dir).is_dir() else []  # not a model ID
    check_out_not_input(out, [*local_model, *(("--adapter", directory) for _, directory, _ in adapters)])
    model, _ = load_model_dir(model_dir, task=adapter_task(adapters[0][1]), dtype=dtype, quantize=quantize,
                              with_tokenizer=False)
    inputs = {}
    for i, (_, directory, weight) in enumerate(adapters):
        load_adapter(model, directory, name=f"input{i}")
        inputs[f"input{i}"] = weight
    try:
        report = combine(model, inputs, name="default", method=method, rank=rank, density=density, seed=seed)
    except LorakitError as err:  # name the inputs as the user did, not by their internal names
        message = str(err)
        for i, (label, _, _) in enumerate(adapters):
            message = message.replace(f"'input{i}'", repr(label))
        raise type(err)(message) from err
    save_adapter(model, out, name="default")
    report.update(name=None, weights={label: weight for label, _, weight in adapters}, out=str(out))
    return report


# -- checks -----------------------------------------------------------------------------------------------
def resolve_weights(
    model: nn.Module, weights: Weights, adapters: Sequence[str] | None = None
) -> list[tuple[str, float]]:
    """[(adapter name, weight), ...] from a {name: weight} mapping, or a weights list plus the adapter names.

    Raises:
        ConfigError: an empty set, a list without names or of another length, repeated names, a non-finite weight,
            a name that is not a valid adapter name (lorakit.names).
        AdapterNameError: a name that is not attached (the message lists the attached ones).
    """
    if isinstance(weights, Mapping):
        if adapters is not None:
            raise ConfigError("pass the weights as {name: weight} or as a list with adapters=[names], not both")
        terms = list(weights.items())
    elif isinstance(weights, Sequence) and not isinstance(weights, str):
        if adapters is None:
            raise ConfigError("a weights list needs adapters=[names] (one name per weight); or pass {name: weight}")
        adapters = [check_adapter_name(n, "combine: input adapter") for n in adapters]
        if len(adapters) != len(weights):
            raise ConfigError(f"the weights list has {len(weights)} value(s) for {len(adapters)} adapter(s) "
                              f"({', '.join(map(repr, adapters))}); give one weight per adapter")
        if len(set(adapters)) != len(adapters):
            raise ConfigError(f"adapters {adapters} names an adapter more than once")
        terms = list(zip(adapters, weights))
    else:
        raise ConfigError(
            f"weights must be a {{name: weight}} mapping or a list of numbers, got {type(weights).__name__}"
        )
    if not terms:
        raise ConfigError("nothing to combine: no adapters given")
    attached = M.adapter_names(model)
    for adapter_name, weight in terms:
        check_adapter_name(adapter_name, "combine: input adapter")
        if adapter_name not in attached:
            raise AdapterNameError(f"no adapter named {adapter_name!r} on this model; attached: "
                                   f"{', '.join(attached) or '(none)'}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"the weight of adapter {adapter_name!r} must be a finite number, got {weight!r}")
    return [(n, float(w)) for n, w in terms]


def _check_options(method: str, rank: int | None, density: float | None) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown combination method {method!r}; expected one of {', '.join(METHODS)}")
    if method in DENSITY_METHODS:
        check_density(density, method)
    elif density is not None:
        raise ConfigError(f"density applies to {', '.join(DENSITY_METHODS)}, not to method {method!r}")
    if method == "linear" and rank is not None:
        raise ConfigError("method 'linear' is exact and its rank is the sum of the input ranks; for a chosen rank "
                          f"use method 'svd' (got rank={rank!r})")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")


def _check_new_name(model: nn.Module, name: str) -> None:
    check_adapter_name(name, "combine(name=...)")
    if name in M.adapter_names(model):
        raise AdapterNameError(f"an adapter named {name!r} is already attached; pick another name for the combination")


def _check_inputs(model: nn.Module, terms: list[tuple[str, float]], method: str, making_adapter: bool) -> None:
    names = [n for n, _ in terms]
    for name in names:
        config = M.get_config(model, name)
        if not variant_named(config.method).abilities_for(config).combine:
            raise ConfigError(f"adapter {name!r} is a {config.method} adapter, which lorakit.combine cannot take as "
                              "an input; merge it into the base instead (merge / merge_and_unload)")
        if config.residual_init:
            raise ConfigError(
                f"adapter {name!r} was initialised with {config.init!r}: its update is relative to a residual base; "
                "save it with convert_to_lora=True, load that file, and combine the plain LoRA adapter"
            )
    for layer in M.lora_layers(model):
        present = [n for n in names if n in layer.adapters]
        if present and layer.merged:
            raise MergeError(f"module {layer.path!r} has adapter(s) {layer.merged} merged into its weight; "
                             "unmerge() before combining")
        if making_adapter and method == "linear":
            for n in present:
                if not _is_low_rank(layer.adapters[n]):
                    raise ConfigError(
                        f"adapter {n!r} on module {layer.path!r} is a {type(layer.adapters[n]).__name__}: its update "
                        "is not s B A, so method 'linear' cannot combine its factors exactly; use method='svd' (the "
                        "weighted sum of the deltas, truncated) or merge_combination()"
                    )


# -- per module -------------------------------------------------------------------------------------------
def _is_low_rank(adapter: LoraAdapter) -> bool:
    """True when the variant declares its update is plain LoRA's ΔW = s B A of its lora_A, lora_B."""
    return adapter.abilities.low_rank


def _delta_dk(layer: LoraLayer, adapter: LoraAdapter) -> torch.Tensor:
    """The adapter's ΔW (fp32) in LoRA's layout (d, k, *kernel): to_weight_layout is its own inverse."""
    return layer.kind.to_weight_layout(adapter.delta_weight(layer.base_layer))


def _plan(model: nn.Module, terms: list[tuple[str, float]]) -> _Plan:
    """Every layer with at least one input adapter, with the (adapter, weight) pairs present there."""
    plan = []
    for layer in M.lora_layers(model):
        present = [(layer.adapters[n], w) for n, w in terms if n in layer.adapters]
        if present:
            plan.append((layer, present))
    return plan


def _combined_factors(
    layer: LoraLayer,
    present: list[tuple[LoraAdapter, float]],
    method: str,
    rank: int,
    density: float | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(A (r, k·kernel), B (d, r), kept energy, total energy) of the combination at one layer."""
    low_rank = all(_is_low_rank(a) for a, _ in present)
    if method in ("linear", "svd") and low_rank:
        lora_a, lora_b = linear_factors([(a.lora_A, a.lora_B, a.scale, w) for a, w in present])
        if method == "linear":
            return lora_a.flatten(1), lora_b.flatten(1), 1.0, 1.0
        return truncate_factors(lora_a, lora_b, rank)
    deltas = [_delta_dk(layer, a) for a, _ in present]
    merged = combine_deltas(method, deltas, [w for _, w in present], density, generator)
    return truncate_delta(merged, rank)


def _combined_saved(
    model: nn.Module, terms: list[tuple[str, float]], method: str, density: float | None, generator: torch.Generator
) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {tensor name: original + combined (copy_i - original)}} for modules_to_save with input copies."""
    delta_method = "linear" if method == "svd" else method  # a full copy is not truncated
    result: dict[str, dict[str, torch.Tensor]] = {}
    for wrapper in M.saved_modules(model):
        present = [(wrapper.copies[n].state_dict(), w) for n, w in terms if n in wrapper.copies]
        if not present:
            continue
        tensors = {}
        for pname, original in wrapper.original_module.state_dict().items():
            if not original.is_floating_point():
                continue
            deltas = [state[pname].float() - original.float() for state, _ in present]
            combined = combine_deltas(delta_method, deltas, [w for _, w in present], density, generator)
            tensors[pname] = (original.float() + combined).to(original.dtype)
        result[wrapper.path] = tensors
    return result


def _combined_config(model: nn.Module, terms: list[tuple[str, float]], ranks: dict[str, int]) -> LoraConfig:
    """The new adapter's config: the first input's, with r = alpha per module (scale 1), the union of the targets
    (short names where they suffice, else full paths), full-path rank / alpha patterns, plain LoRA (no rsLoRA,
    DoRA, LoRA-FA), no trainable biases, and the inputs' modules_to_save."""
    first = M.get_config(model, terms[0][0])
    default = Counter(ranks.values()).most_common(1)[0][0]
    others = sorted((p for p, r in ranks.items() if r != default), key=len, reverse=True)
    to_save = sorted({m for n, _ in terms for m in (M.get_config(model, n).modules_to_save or [])})
    config = _config_with(first, default, others, ranks, to_save)
    if any(config.rank_for(p) != r for p, r in ranks.items()):  # a pattern key matched a longer path too
        config = _config_with(first, default, sorted(ranks, key=len, reverse=True), ranks, to_save)
    short = config.replace(target_modules=sorted({p.rsplit(".", 1)[-1] for p in ranks}))
    found = {p for p, m in iter_candidate_modules(model) if is_target(short, p, m, set())}
    return short if found == set(ranks) else config  # short names when they target exactly these modules


def _config_with(first: LoraConfig, default: int, keys: list[str], ranks: dict[str, int],
                 to_save: list[str]) -> LoraConfig:
    return first.replace(
        r=default, alpha=float(default), target_modules=sorted(ranks), use_rslora=False, use_dora=False,
        lora_fa=False, init="kaiming", bias="none", exclude_modules=None, layers_to_transform=None,
        layers_pattern=None, rank_pattern={p: ranks[p] for p in keys},
        alpha_pattern={p: float(ranks[p]) for p in keys}, modules_to_save=to_save or None,
        adapter_dtype="float32", fan_in_fan_out=False,
    )


def _report(
    name: str | None,
    method: str,
    terms: list[tuple[str, float]],
    density: float | None,
    seed: int,
    ranks: Mapping[str, int | None],
    energy: dict[str, tuple[float, float]],
    saved: list[str],
) -> dict[str, Any]:
    kept = sum(k for k, _ in energy.values())
    total = sum(t for _, t in energy.values())
    return {
        "name": name,
        "method": method,
        "weights": dict(terms),
        "density": density,
        "seed": seed,
        "rank": dict(ranks),
        "energy_kept": {path: energy_share(k, t) for path, (k, t) in energy.items()},
        "energy_kept_total": 1.0 if method == "linear" else energy_share(kept, total),
        "modules_to_save": saved,
    }
