"""What a trained adapter learned, from its low-rank factors alone (never a d x k matrix).

For one adapted module the update is ΔW = s · B A with B (d x r), A (r x k) and s the scaling. With the thin QR
factorisations B = Q_B R_B and Aᵀ = Q_A R_A (Q_B: d x r, Q_A: k x r, orthonormal columns; R_B, R_A: r x r),

    ΔW = s · Q_B (R_B R_Aᵀ) Q_Aᵀ,      core C = s · R_B R_Aᵀ  (r x r),      C = U Σ Vᵀ (SVD)
    =>  ΔW = (Q_B U) Σ (Q_A V)ᵀ        is an SVD of ΔW: its non-zero singular values are exactly those of C,
        ||ΔW||_F = ||C||_F = sqrt(Σ σ_i²)

at a cost of O((d + k) r²) instead of O(d k r). (When d < r or k < r the QR factors are d x d / k x k and the
core is min(d, r) x min(k, r); the identities are unchanged.) Every function here computes in float64.

Measures reported per module (by `adapter_report`, used by `lorakit inspect`):

* numerical rank:    rank_tol(σ) = #{ i : σ_i > tol · σ_1 }          (tol = 1e-3 by default)
* effective rank:    erank(σ) = exp(H(p)),  p_i = σ_i / Σ_j σ_j,  H(p) = -Σ p_i ln p_i
                     (Roy & Vetterli 2007: 1 for a rank-1 update, r when all r values are equal)
* energy share:      E_m(σ) = (σ_1² + ... + σ_m²) / Σ_i σ_i²   (m = 1 and m = ceil(r / 2))
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterFileError, ShapeMismatchError
from .io.format import PREFIX, factor_suffixes
from .variants import variant_for

DEFAULT_RANK_TOL = 1e-3


# -- pure math -------------------------------------------------------------------------------------------
def lowrank_singular_values(lora_B: torch.Tensor, lora_A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values of ΔW = scale · B A, descending, float64, from the factors only.

    B is (d, r[, 1, ...]) and A is (r, k[, kernel...]) as stored in adapter files (a convolution's A is
    flattened to r x (k · kernel)). With B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ,
    so the singular values of ΔW are those of the small core s R_B R_Aᵀ; min(d, k, r) values are returned
    (the rest of ΔW's spectrum is zero).
    """
    b = lora_B.detach().to("cpu", torch.float64).flatten(1)  # (d, r)
    a = lora_A.detach().to("cpu", torch.float64).flatten(1)  # (r, k)
    if b.shape[1] != a.shape[0]:
        raise ShapeMismatchError(f"B is {tuple(lora_B.shape)} and A is {tuple(lora_A.shape)}: their ranks differ")
    r_b = torch.linalg.qr(b, mode="reduced").R  # (min(d, r), r)
    r_a = torch.linalg.qr(a.t(), mode="reduced").R  # (min(k, r), r)
    core = (r_b @ r_a.t()) * float(scale)  # (min(d, r), min(k, r))
    return torch.linalg.svdvals(core)


def frobenius_norm(singular_values: torch.Tensor) -> float:
    """||ΔW||_F = sqrt(Σ σ_i²)."""
    return float(torch.linalg.vector_norm(singular_values.double()))


def lowrank_frobenius_norm(lora_B: torch.Tensor, lora_A: torch.Tensor, scale: float = 1.0) -> float:
    """||scale · B A||_F without forming B A: the Frobenius norm of the core s R_B R_Aᵀ (QR of B and Aᵀ)."""
    return frobenius_norm(lowrank_singular_values(lora_B, lora_A, scale))


def numerical_rank(singular_values: torch.Tensor, rel_tol: float = DEFAULT_RANK_TOL) -> int:
    """#{ i : σ_i > rel_tol · σ_max }; 0 for an all-zero update."""
    sv = singular_values.double()
    if sv.numel() == 0 or float(sv.max()) <= 0.0:
        return 0
    return int((sv > rel_tol * sv.max()).sum())


def entropy_effective_rank(singular_values: torch.Tensor) -> float:
    """exp(H(p)) with p_i = σ_i / Σ_j σ_j and H(p) = -Σ p_i ln p_i (Roy & Vetterli 2007); 0 for an all-zero
    update. Between 1 (one direction) and the number of non-zero σ (all equal)."""
    sv = singular_values.double()
    total = float(sv.sum())
    if total <= 0.0:
        return 0.0
    p = sv[sv > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def energy_share(singular_values: torch.Tensor, top: int) -> float | None:
    """(σ_1² + ... + σ_top²) / Σ_i σ_i² (the share of ||ΔW||_F² in the top directions); None for a zero update."""
    sv = torch.sort(singular_values.double(), descending=True).values
    energy = sv.square()
    total = float(energy.sum())
    if total <= 0.0:
        return None
    return float(energy[: max(int(top), 0)].sum()) / total


# -- reading an adapter directory ------------------------------------------------------------------------
def _group_factors(tensors: dict[str, torch.Tensor], where: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """{module path: {"A": tensor, "B": tensor, "kind": ...}} and the parameter count of other tensors
    (modules_to_save copies, biases)."""
    modules: dict[str, dict[str, Any]] = {}
    other = 0
    for key, tensor in tensors.items():
        for suffix, (factor, kind) in factor_suffixes().items():  # io.format: every layer kind's A / B keys
            if key.endswith(suffix):
                path = key[:-len(suffix)]
                path = path[len(PREFIX):] if path.startswith(PREFIX) else path
                entry = modules.setdefault(path, {"kind": kind})
                if tensor.dim() > 2:
                    entry["kind"] = "conv"
                entry[factor] = tensor
                break
        else:
            other += tensor.numel()
    for path, entry in modules.items():
        if "A" not in entry or "B" not in entry:
            missing = "lora_B" if "A" in entry else "lora_A"
            raise AdapterFileError(f"{where}: module {path!r} has no {missing} tensor")
    return modules, other


def adapter_report(
    adapter_dir: str | Path,
    model_dir: str | Path | None = None,
    rel_tol: float = DEFAULT_RANK_TOL,
    dtype: str | None = "auto",
    quantize: str | None = None,
) -> dict[str, Any]:
    """Per-module statistics of the adapter in `adapter_dir`, read from its files (no base model needed).

    Per module: shape d x k of ΔW (k includes a convolution's kernel), r, alpha, s, ||s B A||_F, the singular
    values, numerical rank (σ_i > rel_tol · σ_1), entropy effective rank, energy share of the top-1 and top
    ceil(r/2) singular values, and with `model_dir` also ||W0||_F and the ratio ||s B A||_F / ||W0||_F.

    Totals: adapter parameters (every tensor in the file), bytes on disk of the files directly in
    `adapter_dir`, and what a full fine-tune would store: with `model_dir`, every parameter of the model at
    its stored dtype; without, the adapted matrices only at 4 bytes (fp32) per value (`full_ft_basis` says
    which). `model_dir` may be a model ID; `dtype` and `quantize` are lorakit.load_model's (with "nf4", ||W0||
    is the norm of the dequantised weight, the base a QLoRA adapter trained on, and a quantised weight counts
    at the dtype of the model's other weights in the full fine-tune size).

    Raises:
        AdapterFileError: a missing directory, missing or corrupt files, an unpaired A / B, a module the model
            lacks. ModelDirError: a bad `model_dir`. ShapeMismatchError: a module whose weight has another shape.
    """
    from .config import LoraConfig
    from .io.files import read_config, read_weights
    from .ops.lora import lora_scaling

    directory = Path(adapter_dir)
    if not directory.is_dir():
        raise AdapterFileError(f"adapter directory {directory} does not exist")
    raw_config = read_config(directory)
    try:
        config = LoraConfig.from_peft_dict(raw_config, where=str(directory / "adapter_config.json"))
    except Exception as err:  # ConfigError or a field of the wrong type
        raise AdapterFileError(f"{directory / 'adapter_config.json'}: {err}") from err
    model = None
    if model_dir is not None:
        from .hf import adapter_task, load_model_dir

        model, _ = load_model_dir(model_dir, task=adapter_task(directory), dtype=dtype, quantize=quantize,
                                  with_tokenizer=False)
    weights = read_weights(directory)
    try:  # e.g. AdaLoRA's P E Q, VeRA's shared A, B and vectors: the same ΔW as LoRA factors
        config, tensors = variant_for(config).as_lora_file(config, weights, _in_features(model))
    except AdapterFileError as err:
        raise AdapterFileError(f"{directory}: {err}") from err
    factors, other_params = _group_factors(tensors, directory)
    if not factors:
        raise AdapterFileError(f"{directory}: the weights file has no LoRA tensors (lora_A / lora_B)")

    modules = []
    warnings = []
    for path in sorted(factors):
        entry = factors[path]
        lora_A, lora_B = entry["A"], entry["B"]
        r = int(lora_A.shape[0])
        if config.rank_for(path) != r:
            warnings.append(f"{path}: tensors have rank {r}, adapter_config.json says r={config.rank_for(path)}")
        alpha = float(config.alpha_for(path))
        scale = lora_scaling(alpha, r, config.use_rslora)
        d, k = int(lora_B.shape[0]), int(lora_A[0].numel())
        sv = lowrank_singular_values(lora_B, lora_A, scale)
        norm = frobenius_norm(sv)
        half = max(1, math.ceil(r / 2))
        row: dict[str, Any] = {
            "module": path, "kind": entry["kind"], "d": d, "k": k, "r": r, "alpha": alpha, "scaling": scale,
            "delta_fro_norm": norm,
            "numerical_rank": numerical_rank(sv, rel_tol),
            "effective_rank": entropy_effective_rank(sv),
            "energy_top1": energy_share(sv, 1),
            "energy_top_half": energy_share(sv, half), "top_half": half,
            "singular_values": [float(x) for x in sv],
            "params": int(lora_A.numel() + lora_B.numel()),
            "weight_fro_norm": None, "ratio_to_weight": None,
        }
        if model is not None:
            w0 = _base_weight(model, path, directory)
            if w0.numel() != d * k:
                raise ShapeMismatchError(
                    f"{directory}: module {path!r}: the adapter is for a {d} x {k} update, the model's weight has "
                    f"shape {tuple(w0.shape)}"
                )
            w_norm = float(torch.linalg.vector_norm(w0.detach().double()))
            row["weight_fro_norm"] = w_norm
            row["ratio_to_weight"] = norm / w_norm if w_norm > 0 else None
        magnitude = tensors.get(f"{PREFIX}{path}.lora_magnitude_vector", tensors.get(f"{path}.lora_magnitude_vector"))
        if magnitude is not None:  # DoRA: the trained magnitude per output row, and with W0 its change
            row["dora"] = _dora_rows(magnitude, lora_A, lora_B, scale, model, path, directory)
        modules.append(row)

    lora_params = sum(m["params"] for m in modules)
    disk = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    if model is not None:
        full_bytes, full_params = _model_bytes(model)
        basis = "model parameters x stored dtype bytes"
    else:
        full_params = sum(m["d"] * m["k"] for m in modules)
        full_bytes = 4 * full_params
        basis = "adapted matrices only, d x k x 4 bytes (fp32); pass --model for the whole model"
    return {
        "adapter_dir": str(directory),
        "model_dir": None if model_dir is None else str(model_dir),
        "config": {"r": config.r, "alpha": config.alpha, "use_rslora": config.use_rslora,
                   "target_modules": config.target_modules, "task_type": config.task_type},
        "rank_tol": rel_tol,
        "modules": modules,
        "totals": {
            "modules": len(modules),
            "adapter_params": lora_params + other_params,
            "lora_params": lora_params,
            "other_params": other_params,
            "adapter_bytes_on_disk": disk,
            "full_ft_params": full_params,
            "full_ft_bytes": full_bytes,
            "full_ft_basis": basis,
            "disk_ratio": disk / full_bytes if full_bytes else None,
        },
        "warnings": warnings,
    }


def _in_features(model: torch.nn.Module | None) -> dict[str, int] | None:
    """{module path: input size k} of the model's layers of a registered kind (None without a model)."""
    if model is None:
        return None
    from .layer_kinds import kind_of

    found = {}
    for path, module in model.named_modules():
        kind = kind_of(module)
        if kind is not None:
            found[path] = int(kind.dims(module)[0])
    return found


def _base_weight(model: torch.nn.Module, path: str, where: Path) -> torch.Tensor:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        module = None
    weight = getattr(module, "weight", None)
    if not torch.is_tensor(weight):
        raise AdapterFileError(
            f"{where}: the adapter has weights for module {path!r}, which this model does not have (or has no "
            f"weight); was it trained on another model?"
        )
    return weight


def _dora_rows(magnitude: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
               model: torch.nn.Module | None, path: str, where: Path) -> dict[str, Any]:
    """A DoRA module's magnitude m per output row; with the model also, per row, the magnitude change
    ΔM_i = m_i - ||W0_i|| and the direction change ΔD_i = 1 - cos(W0_i + s (B A)_i, W0_i) (ops.dora), and their means
    (mean |ΔM_i|, mean ΔD_i: the DoRA paper's ΔM and ΔD)."""
    from .layer_kinds import kind_of
    from .ops.dora import lowrank_magnitude_direction

    m = magnitude.detach().reshape(-1).float()
    found: dict[str, Any] = {"magnitude": [float(x) for x in m], "magnitude_change": None, "direction_change": None,
                             "mean_abs_magnitude_change": None, "mean_direction_change": None}
    if model is None:
        return found
    module = model.get_submodule(path)
    kind = kind_of(module)
    layout = kind.weight_layout if kind is not None else "dk"
    dm, dd = lowrank_magnitude_direction(_base_weight(model, path, where).detach(), layout, lora_A.float(),
                                         lora_B.float(), scale, m)
    found.update(magnitude_change=[float(x) for x in dm], direction_change=[float(x) for x in dd],
                 mean_abs_magnitude_change=float(dm.abs().mean()), mean_direction_change=float(dd.mean()))
    return found


def _model_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes, parameter count) of the model's parameters at their dtype; shared parameters counted once."""
    from .quant import NF4Linear

    seen: set[int] = set()
    total = count = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel() * param.element_size()
        count += param.numel()
    stored = max(((p.element_size(), p.numel()) for p in model.parameters()), key=lambda e: e[1], default=(4, 0))[0]
    for module in model.modules():  # an NF4 weight, as a full fine-tune would store it: at the model's dtype
        if isinstance(module, NF4Linear):
            total += module.out_features * module.in_features * stored
            count += module.out_features * module.in_features
    return total, count


# -- presentation ----------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def format_report(report: dict[str, Any]) -> str:
    """The report as a text table (one row per module) followed by the totals."""
    with_model = report["model_dir"] is not None
    headers = ["module", "shape", "r", "alpha", "s", "||sBA||_F"]
    if with_model:
        headers.append("/||W0||_F")
    headers += [f"rank>{report['rank_tol']:g}", "erank", "top1", "top-r/2"]
    rows = []
    for m in report["modules"]:
        row = [m["module"], f"{m['d']}x{m['k']}", str(m["r"]), f"{m['alpha']:g}", f"{m['scaling']:.4g}",
               f"{m['delta_fro_norm']:.4g}"]
        if with_model:
            row.append(_fmt(m["ratio_to_weight"], ".3g"))
        row += [str(m["numerical_rank"]), f"{m['effective_rank']:.2f}", _fmt(m["energy_top1"], ".1%"),
                _fmt(m["energy_top_half"], ".1%")]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    t = report["totals"]
    out.append("")
    out.append(f"adapter:          {report['adapter_dir']}  ({t['modules']} modules)")
    params = f"{t['adapter_params']:,}"
    if t["other_params"]:
        params += f"  (LoRA factors {t['lora_params']:,}, other tensors {t['other_params']:,})"
    out.append(f"trainable params: {params}")
    out.append(f"adapter on disk:  {t['adapter_bytes_on_disk']:,} bytes ({_human_bytes(t['adapter_bytes_on_disk'])})")
    ratio = f", adapter = {t['disk_ratio']:.2%} of it" if t["disk_ratio"] else ""
    out.append(
        f"full fine-tune:   {t['full_ft_bytes']:,} bytes ({_human_bytes(t['full_ft_bytes'])}; {t['full_ft_params']:,} "
        f"params; {t['full_ft_basis']}){ratio}"
    )
    out.append(
        f"columns: s = alpha/r{' (rsLoRA: alpha/sqrt(r))' if report['config']['use_rslora'] else ''}; "
        f"rank>{report['rank_tol']:g} = #singular values above {report['rank_tol']:g} x the largest; "
        "erank = exp(entropy of sigma/sum sigma); top1, top-r/2 = share of sum sigma^2 in the top 1 / ceil(r/2) values"
    )
    for warning in report["warnings"]:
        out.append(f"warning: {warning}")
    return "\n".join(out)
