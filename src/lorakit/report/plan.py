"""The memory and storage arithmetic of LoRA before training (`lorakit plan`): pure functions over a model's shapes.

    lora_params(d, k, r)  = r (d + k)              a d x k layer's adapter: B (d x r) and A (r x k)
    savings_ratio(d, k, r) = d k / (r (d + k))     4096 x 4096 at r = 8: 16,777,216 / 65,536 = 256x
    nf4_bytes(n)          = n / 2 + n / 64 + 4 n / (64 * 256) + 4     NF4 codes + 8-bit block scales (double
                                                                       quantisation) + fp32 second-level scales

A Plan adds up, for one training set-up: the frozen base (fp32 / bf16 / NF4), the fp32 adapter, its gradients,
AdamW's two fp32 moments per trainable parameter, an activation estimate (`activation_elements`), the gradient
bytes one data-parallel step all-reduces, and the storage of M task adapters against M full copies. Every
figure is in bytes; the model's shapes come from lorakit.report.plan_model (a config on the meta device).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError

NF4_BLOCKSIZE = 64  # QLoRA's block of weights sharing one scale
ABSMAX_BLOCKSIZE = 256  # blocks of the second (8-bit) quantisation of the scales (lorakit.quant.nf4)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAPTER_BYTES = 4  # A and B in fp32 (LoraConfig.adapter_dtype's default), and so their gradients
ADAM_MOMENTS = 2  # AdamW: exp_avg and exp_avg_sq, fp32, per trainable parameter


# -- the seeds' formulas ---------------------------------------------------------------------------------
def lora_params(d: int, k: int, r: int) -> int:
    """Parameters of a rank-r adapter on a d x k weight: B (d x r) plus A (r x k) = r (d + k).

    Raises:
        ConfigError: a dimension or rank below 1.
    """
    _check_positive(d=d, k=k, r=r)
    return r * (d + k)


def savings_ratio(d: int, k: int, r: int) -> float:
    """How many times fewer parameters the adapter trains than the full d x k weight: d k / (r (d + k)).

    Raises:
        ConfigError: a dimension or rank below 1.
    """
    return d * k / lora_params(d, k, r)


def nf4_bytes(numel: int, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True) -> int:
    """Bytes of one weight tensor stored in NF4 as lorakit.quant.nf4 stores it: two 4-bit codes per byte, one
    scale per block of `blocksize` (an 8-bit code with double quantisation, plus one fp32 scale per 256 blocks
    and one fp32 offset; without it an fp32 scale per block).

    Raises:
        ConfigError: numel below 0 or blocksize below 1.
    """
    if numel < 0 or blocksize < 1:
        raise ConfigError(f"nf4_bytes: expected numel >= 0 and blocksize >= 1, found {numel}, {blocksize}")
    blocks = math.ceil(numel / blocksize)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * math.ceil(blocks / ABSMAX_BLOCKSIZE) + 4


def ring_allreduce_bytes(nbytes: int, world_size: int) -> float:
    """Bytes each rank sends in a ring all-reduce of `nbytes` over `world_size` ranks: 2 (W - 1) / W x nbytes."""
    _check_positive(world_size=world_size)
    return 2 * (world_size - 1) / world_size * nbytes


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, found {value}")


# -- a model's shapes (lorakit.report.plan_model fills these from a config) -----------------------------
@dataclass(frozen=True)
class Architecture:
    """The dimensions the activation estimate reads (a decoder-only transformer)."""

    layers: int  # decoder layers L
    hidden: int  # model width h (the residual stream)
    q_dim: int  # heads x head_dim (usually h)
    kv_dim: int  # key / value heads x head_dim (h without grouped-query attention)
    intermediate: int  # MLP width i
    heads: int  # attention heads a
    vocab: int  # V
    gated_mlp: bool  # SwiGLU-style (gate, up, down) rather than two matrices
    stores_scores: bool  # eager attention keeps the a x s x s softmax; SDPA / flash attention does not


@dataclass(frozen=True)
class ModelShapes:
    """What a plan needs of a model: its parameters (deduplicated), which of them NF4 would quantise, the
    adapters a target spec gives (leaf name and parameter count each) and the architecture."""

    name: str
    params: dict[str, int]  # parameter name -> numel (tied parameters once)
    quantizable: frozenset[str]  # parameter names of the weights --quantize nf4 stores in NF4
    adapted: tuple[tuple[str, int, int], ...]  # (module path, adapter parameters at rank r, input features)
    architecture: Architecture
    linears: tuple[tuple[str, int], ...] = ()  # (path, input features) of every linear (full fine-tuning's inputs)

    @property
    def total_params(self) -> int:
        return sum(self.params.values())


# -- activations ----------------------------------------------------------------------------------------
# Which input an adapted module reads, by its name: modules of one role in one layer share that input tensor
# (q, k and v all read the first norm's output). GPT-2's c_proj is the attention's or the MLP's by its parent.
INPUT_ROLES = {
    "attention input": ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query", "key", "value", "Wqkv"),
    "attention output": ("o_proj", "out_proj", "attn.c_proj", "attention.output.dense"),
    "mlp input": ("gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "w1", "w3", "intermediate.dense"),
    "mlp inner": ("down_proj", "mlp.c_proj", "fc2", "w2", "output.dense"),
}


def input_role(path: str) -> str | None:
    """The role (a key of INPUT_ROLES) of the module at `path` by its name or dotted suffix; None if unknown."""
    for role, names in INPUT_ROLES.items():
        if any(path == n or path.endswith("." + n) for n in names):
            return role
    return None


def adapted_input_elements(modules: Iterable[tuple[str, int]]) -> int:
    """Elements per token that trained (path, input features) modules keep beyond a frozen base's activations:
    each one's input (LoRA's gradient of A, or a weight's gradient, needs it; a frozen linear keeps none), once
    per input tensor: modules of one role in one layer share it; a module of unknown role counts its own."""
    inputs: dict[tuple[str, str], int] = {}
    for path, in_features in modules:
        role = input_role(path)
        parent = path.rsplit(".", 2)[0] if role is not None else path  # the layer holding self_attn / mlp
        inputs[(parent, role or "own")] = in_features
    return sum(inputs.values())


def layer_activation_elements(arch: Architecture) -> int:
    """Elements per token one decoder layer keeps for backward with a frozen base (an estimate, in the compute
    dtype; adapters' inputs are added by `adapted_input_elements`):

        2 h             the layer input and the residual after attention (the two norms keep their inputs)
        + 2 q + 2 kv    Q and K after RoPE, V, and the attention output (kept by SDPA / flash attention)
        + 3 i (gated)   gate output, up output and the activation of the gate (kept by the product)
          or 1 i        the first matrix's output (kept by the activation)
        + a s           eager attention only: the softmax of the scores (a x s per token)

    A frozen linear keeps nothing; LoRA's r values per token are left out (r << h)."""
    per_token = 2 * arch.hidden + 2 * arch.q_dim + 2 * arch.kv_dim
    return per_token + (3 if arch.gated_mlp else 1) * arch.intermediate


def head_activation_bytes(arch: Architecture, tokens: int, dtype_bytes: int) -> int:
    """Bytes of the output head at the peak of a step (an estimate): the final norm's input and the logits in
    the compute dtype, then in fp32 the log-softmax the cross-entropy keeps and the logits' gradient that
    backward starts with."""
    logits = tokens * arch.vocab
    return (tokens * arch.hidden + logits) * dtype_bytes + 2 * logits * 4


def activation_bytes(arch: Architecture, adapted_inputs: int, batch: int, seq_len: int, dtype_bytes: int) -> int:
    """The activation estimate of one training step, in bytes, for b x s tokens:

        b s (L (layer_activation_elements + a s if eager) + adapted_inputs + one layer's again) x dtype bytes
        + head_activation_bytes

    where `adapted_inputs` is adapted_input_elements (all layers), and "one layer's again" is the working set
    of backward through a layer: the gradients of that layer's activations, alive next to the stored ones.

    Raises:
        ConfigError: batch, seq_len or dtype_bytes below 1.
    """
    _check_positive(batch=batch, seq_len=seq_len, dtype_bytes=dtype_bytes)
    tokens = batch * seq_len
    layer = layer_activation_elements(arch) + (arch.heads * seq_len if arch.stores_scores else 0)
    working = layer + adapted_inputs // max(arch.layers, 1)
    body = tokens * (arch.layers * layer + adapted_inputs + working) * dtype_bytes
    return body + head_activation_bytes(arch, tokens, dtype_bytes)


# -- the plan -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """The memory and storage figures of one LoRA set-up (bytes unless named otherwise)."""

    model: str
    r: int
    target_modules: list[str] | str
    dtype: str  # the base's (and the activations') dtype: fp32 | bf16 | fp16
    quantize: str | None  # None or "nf4"
    batch: int
    seq_len: int
    tasks: int
    world_size: int | None
    total_params: int
    adapted_modules: int
    trainable_by_type: dict[str, int]  # leaf module name (q_proj, v_proj, ...) -> adapter parameters
    trainable: int
    base_bytes: dict[str, int]  # "fp32", "bf16", "nf4" (NF4 linears, the rest at `dtype`)
    base: int  # the base as this set-up stores it
    adapter: int
    gradients: int
    adamw: int
    activations: int
    total: int  # base + adapter + gradients + adamw + activations
    full_finetune: dict[str, int] = field(default_factory=dict)  # the same figures when every weight trains
    ddp: dict[str, float] = field(default_factory=dict)  # gradient bytes all-reduced per step
    storage: dict[str, int] = field(default_factory=dict)  # M adapters against M full copies

    def to_dict(self) -> dict[str, Any]:
        """Every figure, JSON-ready."""
        return asdict(self)


def base_bytes(shapes: ModelShapes, dtype: str) -> dict[str, int]:
    """Bytes of the frozen base at fp32, at bf16, and in NF4 with double quantisation (the quantisable linears;
    embeddings, norms and heads at `dtype`)."""
    nf4 = sum(nf4_bytes(n) if name in shapes.quantizable else n * DTYPE_BYTES[dtype]
              for name, n in shapes.params.items())
    return {"fp32": shapes.total_params * 4, "bf16": shapes.total_params * 2, "nf4": nf4}


def trainable_by_type(adapted: tuple[tuple[str, int, int], ...]) -> dict[str, int]:
    """Adapter parameters summed per leaf module name (q_proj, v_proj, ...), in order of first appearance."""
    found: dict[str, int] = {}
    for path, params, _ in adapted:
        leaf = path.rsplit(".", 1)[-1]
        found[leaf] = found.get(leaf, 0) + params
    return found


def make_plan(shapes: ModelShapes, *, r: int, target_modules: list[str] | str, dtype: str = "bf16",
              quantize: str | None = None, batch: int = 8, seq_len: int = 512, tasks: int = 100,
              world_size: int | None = None) -> Plan:
    """The Plan of training `shapes`' adapters (rank r, fp32 adapter, AdamW) on a `dtype` base, quantised or not.

    Raises:
        ConfigError: an unknown dtype or quantize, or a count below 1.
    """
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"--dtype: expected one of {', '.join(DTYPE_BYTES)}, found {dtype!r}")
    if quantize not in (None, "nf4"):
        raise ConfigError(f"--quantize: expected none or nf4, found {quantize!r}")
    _check_positive(r=r, batch=batch, seq_len=seq_len, tasks=tasks)
    dbytes = DTYPE_BYTES[dtype]
    per_type = trainable_by_type(shapes.adapted)
    trainable = sum(per_type.values())
    bases = base_bytes(shapes, dtype)
    base = bases["nf4"] if quantize == "nf4" else shapes.total_params * dbytes
    adapter = gradients = trainable * ADAPTER_BYTES
    adamw = trainable * ADAM_MOMENTS * 4
    arch = shapes.architecture
    adapted_inputs = adapted_input_elements((path, k) for path, _, k in shapes.adapted)
    activations = activation_bytes(arch, adapted_inputs, batch, seq_len, dbytes)
    full_activations = activation_bytes(arch, adapted_input_elements(shapes.linears), batch, seq_len, dbytes)
    full = _full_finetune(shapes.total_params, dbytes, full_activations)
    return Plan(
        model=shapes.name, r=r, target_modules=target_modules, dtype=dtype, quantize=quantize, batch=batch,
        seq_len=seq_len, tasks=tasks, world_size=world_size, total_params=shapes.total_params,
        adapted_modules=len(shapes.adapted), trainable_by_type=per_type, trainable=trainable, base_bytes=bases,
        base=base, adapter=adapter, gradients=gradients, adamw=adamw, activations=activations,
        total=base + adapter + gradients + adamw + activations, full_finetune=full,
        ddp=ddp_bytes(trainable, shapes.total_params, dbytes, world_size),
        storage=storage_bytes(trainable, shapes.total_params, dbytes, tasks),
    )


def _full_finetune(total_params: int, dtype_bytes: int, activations: int) -> dict[str, int]:
    """Full fine-tuning of the same model: weights and gradients at the model dtype, AdamW's fp32 moments."""
    weights = gradients = total_params * dtype_bytes
    adamw = total_params * ADAM_MOMENTS * 4
    return {"weights": weights, "gradients": gradients, "adamw": adamw, "activations": activations,
            "total": weights + gradients + adamw + activations}


def ddp_bytes(trainable: int, total_params: int, dtype_bytes: int, world_size: int | None) -> dict[str, float]:
    """Gradient bytes one data-parallel step all-reduces: the fp32 adapter's against full fine-tuning's (every
    parameter's gradient at the model dtype); with a world size, also what each rank sends in a ring."""
    lora = trainable * ADAPTER_BYTES
    full = total_params * dtype_bytes
    found: dict[str, float] = {"lora": lora, "full": full, "ratio": full / lora if lora else math.inf}
    if world_size is not None:
        found.update(world_size=world_size, lora_per_rank=ring_allreduce_bytes(lora, world_size),
                     full_per_rank=ring_allreduce_bytes(full, world_size))
    return found


def storage_bytes(trainable: int, total_params: int, dtype_bytes: int, tasks: int) -> dict[str, int]:
    """Disk for `tasks` task-specific models: one base plus an fp32 adapter per task, against a full copy per
    task at the model dtype (adapter files' few hundred bytes of JSON left out)."""
    adapter = trainable * ADAPTER_BYTES
    copy = total_params * dtype_bytes
    return {"tasks": tasks, "adapter": adapter, "adapters": tasks * adapter, "base": copy,
            "base_plus_adapters": copy + tasks * adapter, "full_copies": tasks * copy}
