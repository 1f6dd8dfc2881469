"""Will vLLM's LoRA loader take this adapter, and will it compute what the adapter was trained to compute?
Pure checks over adapter_config.json (a dict) and the tensors' names and shapes, each after a rule of vLLM's loader.

Where the rules come from (vllm-project/vllm):
    vllm/lora/peft_helper.py  PEFTHelper.from_dict / __post_init__ / _validate_features / validate_legal:
        required r, lora_alpha, target_modules; r > 0; no modules_to_save; no DoRA; bias "none" only;
        r <= max_lora_rank (LoRAConfig, default 16); scale = lora_alpha / r, or lora_alpha / sqrt(r) with
        use_rslora, read as Python truthiness. Fields it does not declare (rank_pattern, alpha_pattern,
        init_lora_weights, layer_replication, ...) are dropped without a word.
    vllm/lora/lora_weights.py  LoRALayerWeights.from_config: every module gets the ONE global rank and
        scale; the scale is folded into B (optimize), so a per-module alpha / r is lost.
    vllm/lora/utils.py  parse_fine_tuned_lora_name: only <module>.lora_A.weight, <module>.lora_B.weight,
        <module>.lora_embedding_A, <module>.lora_embedding_B; anything else raises "unsupported LoRA
        weight", except is_base_embeddding_weights (.embed_tokens/.lm_head .base_layer.weight, skipped).
    vllm/lora/lora_model.py  LoRAModel.from_local_checkpoint: adapter_model.safetensors, .bin or .pt, else
        "doesn't contain tensors"; the A / B of a module are copied into rank-padded 2-D buffers.
Not checked here (it needs the served model): whether each module name is one vLLM's model supports.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from ..config import match_pattern_key
from ..errors import AdapterFileError
from ..ops.lora import lora_scaling
from .files import LEGACY_WEIGHTS_NAME, WEIGHTS_NAME, read_config, read_weights
from .format import PREFIX  # vLLM reads PEFT's prefix
from .residual import RESIDUAL_KEY

DEFAULT_MAX_LORA_RANK = 16  # vLLM's LoRAConfig.max_lora_rank default
REFUSED = "refused"  # vLLM's loader raises
WRONG = "wrong"  # vLLM loads the file and computes something other than what was trained
LORA_SUFFIXES = {  # key suffix -> (factor, the name vLLM parses)
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B",
}
BASE_EMBEDDING_SUFFIXES = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")  # PEFT inits that change the base weights (+ pissa_niter_<n>)
IGNORED_FEATURES = ("layer_replication", "alora_invocation_tokens", "use_qalora")  # PEFT fields vLLM drops
_FALSE_STRINGS = ("false", "0", "no", "off", "")


class VllmWarning(UserWarning):
    """An adapter file that vLLM would load but compute differently from the trained model."""


@dataclass(frozen=True)
class Finding:
    """One reason an adapter is not ready for vLLM."""

    severity: str  # REFUSED (vLLM's loader raises) or WRONG (loads, computes something else)
    code: str  # stable name of the rule, e.g. "dora", "rank", "per_module_scale"
    where: str  # the adapter_config.json field, the module path or the file it is about
    message: str  # what was found and what vLLM does with it

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# -- the config ----------------------------------------------------------------------------------------------
def _truthy_string(config: dict[str, Any], field: str) -> bool:
    """A string boolean that PEFT-style readers take as false but vLLM's `if field:` takes as true."""
    value = config.get(field)
    return isinstance(value, str) and value.strip().lower() in _FALSE_STRINGS


def is_residual_init(init: Any) -> bool:
    """True for an init_lora_weights that leaves a modified base (PiSSA, OLoRA, CorDA, LoftQ)."""
    return isinstance(init, str) and (init.lower() in RESIDUAL_INITS or init.lower().startswith("pissa_niter_"))


def check_config(config: dict[str, Any], max_lora_rank: int | None = DEFAULT_MAX_LORA_RANK) -> list[Finding]:
    """The findings that adapter_config.json alone decides (PEFTHelper's rules), in field order."""
    found: list[Finding] = []
    if config.get("peft_type", "LORA") != "LORA":
        found.append(Finding(REFUSED, "peft_type", "peft_type",
                             f"is {config.get('peft_type')!r}; vLLM loads LoRA adapters only ('LORA')"))
    missing = [f for f in ("r", "lora_alpha", "target_modules") if f not in config]
    for field in missing:  # PEFTHelper.from_dict: "Missing required configuration fields"
        found.append(Finding(REFUSED, "missing_field", field, "is required by vLLM's PEFTHelper and is missing"))
    rank = config.get("r")
    if "r" not in missing and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        found.append(Finding(REFUSED, "rank", "r", f"must be a positive integer, found {rank!r}"))
    elif isinstance(rank, int) and max_lora_rank is not None and rank > max_lora_rank:
        found.append(Finding(REFUSED, "rank", "r",
                             f"r={rank} is above max_lora_rank={max_lora_rank} (start vLLM with "
                             f"--max-lora-rank {_next_rank(rank)} or more)"))
    if config.get("use_dora"):  # _validate_features; a string "false" is truthy there too
        what = f"the string {config['use_dora']!r}, which vLLM reads as true" if _truthy_string(
            config, "use_dora") else "true"
        found.append(Finding(REFUSED, "dora", "use_dora", f"is {what}; vLLM does not support DoRA"))
    if config.get("modules_to_save"):
        found.append(Finding(REFUSED, "modules_to_save", "modules_to_save",
                             f"is {config['modules_to_save']!r}; vLLM only loads adapters without fully "
                             f"trained modules (modules_to_save must be null)"))
    if config.get("bias", "none") != "none":
        found.append(Finding(REFUSED, "bias", "bias",
                             f"is {config['bias']!r}; vLLM supports bias='none' only"))
    if config.get("lora_bias"):
        found.append(Finding(REFUSED, "bias", "lora_bias", "is true; vLLM does not load lora_B biases"))
    if _truthy_string(config, "use_rslora"):
        found.append(Finding(WRONG, "string_bool", "use_rslora",
                             f"is the string {config['use_rslora']!r}: vLLM reads it as true and scales by "
                             f"alpha / sqrt(r) instead of alpha / r"))
    init = config.get("init_lora_weights", True)
    if is_residual_init(init):
        found.append(_residual_finding(str(init)))
    for field in IGNORED_FEATURES:
        if config.get(field):
            found.append(Finding(WRONG, "ignored_field", field,
                                 f"is set ({config[field]!r}); vLLM ignores it and computes a plain LoRA"))
    return found


def _residual_finding(init: str) -> Finding:
    return Finding(WRONG, "residual_init", "init_lora_weights",
                   f"is {init!r}: the adapter expects the residual base W0 - s B0 A0 its init left, and vLLM "
                   f"adds it to the original weights; save it with save_adapter(..., convert_to_lora=True)")


def _next_rank(rank: int) -> int:
    """The smallest value vLLM accepts for --max-lora-rank that holds `rank` (8, 16, 32, 64, ...)."""
    return max(8, 2 ** math.ceil(math.log2(rank)))


# -- the tensors -----------------------------------------------------------------------------------------------
def split_key(key: str) -> tuple[str, str] | None:
    """(module path, "A" | "B") for a key vLLM's parse_fine_tuned_lora_name reads, else None."""
    for suffix, factor in LORA_SUFFIXES.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            return (module[len(PREFIX):] if module.startswith(PREFIX) else module), factor
    return None


def _unparseable(keys: list[str]) -> list[Finding]:
    """One finding per kind of key vLLM cannot parse (its last name part), with a count and an example."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        if split_key(key) is None and not key.endswith(BASE_EMBEDDING_SUFFIXES):
            groups.setdefault(key.rsplit(".", 1)[-1], []).append(key)
    return [
        Finding(REFUSED, "unparseable_key", names[0],
                f"{len(names)} tensor(s) named *.{tail} (e.g. {names[0]!r}): not a LoRA weight vLLM can parse "
                f"(it reads <module>.lora_A.weight / lora_B.weight / lora_embedding_A / lora_embedding_B)")
        for tail, names in groups.items()
    ]


def module_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module path: {"A": shape, "B": shape}} for the LoRA factors among `shapes`."""
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        parsed = split_key(key)
        if parsed is not None:
            modules.setdefault(parsed[0], {})[parsed[1]] = tuple(shape)
    return modules


def _module_findings(module: str, pair: dict[str, tuple[int, ...]], max_lora_rank: int | None,
                     global_rank: Any) -> tuple[list[Finding], int | None]:
    """Pairing, 2-D shapes and rank of one module; returns the findings and its rank (None if unusable)."""
    if set(pair) != {"A", "B"}:
        has, lacking = ("A", "B") if "A" in pair else ("B", "A")
        return [Finding(REFUSED, "unpaired", module, f"has a lora_{has} tensor but no lora_{lacking}")], None
    shape_a, shape_b = pair["A"], pair["B"]
    if len(shape_a) != 2 or len(shape_b) != 2:
        return [Finding(REFUSED, "not_2d", module,
                        f"has A {shape_a} and B {shape_b}; vLLM's LoRA buffers are 2-D (Linear and embedding "
                        f"layers), not convolutions")], None
    if shape_a[0] != shape_b[1]:
        return [Finding(REFUSED, "rank_mismatch", module,
                        f"A has {shape_a[0]} rows and B {shape_b[1]} columns; they must be equal (the rank)")], None
    rank = shape_a[0]
    if max_lora_rank is not None and rank > max_lora_rank and rank != global_rank:
        return [Finding(REFUSED, "rank", module, f"has rank {rank}, above max_lora_rank={max_lora_rank} (start "
                                                 f"vLLM with --max-lora-rank {_next_rank(rank)} or more)")], rank
    return [], rank


def scale_findings(config: dict[str, Any], ranks: dict[str, int]) -> list[Finding]:
    """Modules whose scale (PEFT: alpha_pattern / rank_pattern) differs from the one global scale vLLM applies."""
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0 or not isinstance(alpha, (int, float)):
        return []
    rslora = bool(config.get("use_rslora")) and not _truthy_string(config, "use_rslora")  # a string: check_config
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    vllm_scale = lora_scaling(alpha, rank, rslora)
    found = []
    for module in sorted(ranks):
        key_r, key_a = match_pattern_key(rank_pattern, module), match_pattern_key(alpha_pattern, module)
        module_rank = rank_pattern[key_r] if key_r is not None else rank
        module_alpha = alpha_pattern[key_a] if key_a is not None else alpha
        trained = lora_scaling(module_alpha, module_rank, rslora)
        if not math.isclose(trained, vllm_scale, rel_tol=1e-6):
            found.append(Finding(WRONG, "per_module_scale", module,
                                 f"was trained with scale {trained:.6g} (alpha {module_alpha:g}, r {module_rank}); "
                                 f"vLLM applies the global {vllm_scale:.6g} (lora_alpha {alpha:g}, r {rank}) to "
                                 f"every module and ignores rank_pattern / alpha_pattern"))
    return found


def check_tensors(config: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                  max_lora_rank: int | None = DEFAULT_MAX_LORA_RANK) -> list[Finding]:
    """The findings the tensor names and shapes decide, given the config they came with."""
    found = _unparseable(list(shapes))
    ranks: dict[str, int] = {}
    for module, pair in module_shapes(shapes).items():
        module_found, rank = _module_findings(module, pair, max_lora_rank, config.get("r"))
        found += module_found
        if rank is not None:
            ranks[module] = rank
    if not ranks and not found:
        found.append(Finding(REFUSED, "no_lora_tensors", WEIGHTS_NAME, "holds no LoRA A / B tensors"))
    return found + scale_findings(config, ranks)


def silent_wrong(config: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 metadata: dict[str, str] | None = None) -> list[Finding]:
    """Only the cases vLLM loads and computes wrongly (what save_adapter warns about)."""
    found = [f for f in check_config(config, None) + check_tensors(config, shapes, None) if f.severity == WRONG]
    residual = (metadata or {}).get(RESIDUAL_KEY)
    if residual and not any(f.code == "residual_init" for f in found):
        found.append(_residual_finding(residual))
    return found


# -- files -----------------------------------------------------------------------------------------------------
def read_shapes(directory: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]] | None:
    """({key: shape}, safetensors metadata) of the adapter's weights without reading the tensors (a legacy .bin
    is read whole); None when the directory has no weights file vLLM reads.

    Raises:
        AdapterFileError: a corrupt or truncated weights file.
    """
    path = directory / WEIGHTS_NAME
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
                return shapes, dict(handle.metadata() or {})
        except (SafetensorError, OSError) as err:
            raise AdapterFileError(f"{path} is corrupt or truncated: {err}") from err
    if (directory / LEGACY_WEIGHTS_NAME).is_file():
        return {key: tuple(t.shape) for key, t in read_weights(directory).items()}, {}
    return None


def check_vllm(adapter_dir: str | Path, max_lora_rank: int | None = DEFAULT_MAX_LORA_RANK) -> list[Finding]:
    """Every reason vLLM's LoRA loader would refuse the adapter in `adapter_dir`, or load it and compute
    something other than what was trained. An empty list: it loads and computes the same.

    Args:
        adapter_dir: a directory in PEFT's layout (adapter_config.json + adapter_model.safetensors / .bin).
        max_lora_rank: vLLM's --max-lora-rank (default 16); None skips the rank limit.

    Raises:
        AdapterFileError: no adapter_config.json, or a config / weights file that cannot be read.
    """
    directory = Path(adapter_dir)
    config = read_config(directory)
    found = check_config(config, max_lora_rank)
    read = read_shapes(directory)
    if read is None:
        return found + [Finding(REFUSED, "no_weights", str(directory),
                                f"has no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}); vLLM needs one")]
    shapes, metadata = read
    found += check_tensors(config, shapes, max_lora_rank)
    if metadata.get(RESIDUAL_KEY) and not any(f.code == "residual_init" for f in found):
        found.append(_residual_finding(metadata[RESIDUAL_KEY]))
    return found


def format_findings(findings: list[Finding], adapter: str, max_lora_rank: int | None) -> str:
    """The text `lorakit inspect --check vllm` prints."""
    limit = f"max_lora_rank={max_lora_rank}" if max_lora_rank is not None else "no rank limit"
    if not findings:
        return f"{adapter}: vLLM will load this adapter and compute as trained ({limit})"
    refused = any(f.severity == REFUSED for f in findings)
    head = "vLLM will refuse this adapter" if refused else "vLLM will load this adapter but compute differently"
    return "\n".join([f"{adapter}: {head} ({limit}):", *(f"  {f}" for f in findings)])


def findings_json(findings: list[Finding], adapter: str, max_lora_rank: int | None) -> str:
    """The JSON `lorakit inspect --check vllm --json` prints."""
    return json.dumps({
        "adapter": adapter, "check": "vllm", "max_lora_rank": max_lora_rank, "ok": not findings,
        "loads": not any(f.severity == REFUSED for f in findings),
        "findings": [f.to_dict() for f in findings],
    }, indent=2)


__all__ = [
    "DEFAULT_MAX_LORA_RANK", "Finding", "REFUSED", "VllmWarning", "WRONG", "check_config",
    "check_tensors", "check_vllm", "silent_wrong",
]
