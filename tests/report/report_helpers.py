"""Helpers of the `lorakit report` tests: the page's inlined data, and the rank-k numbers computed independently."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lorakit.analysis import lowrank_singular_values

RUN_STEPS = 8


def inlined_data(html: str) -> dict:
    """The JSON the page inlines in <script type="application/json" id="report-data">."""
    found = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    assert found, "the page has no inlined data"
    return json.loads(found.group(1))


def expected_rank_k(adapter_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """{module: [(energy kept, relative error) for k = 1..r]} computed here from the factors in the file, with
    the truncation error as ||ΔW - ΔW_k||_F / ||ΔW||_F from torch's SVD of the small product (independent of
    lorakit.report)."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        b = tensors[key.replace("lora_A", "lora_B")]
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        scale = cfg["lora_alpha"] / cfg["r"]
        sv = lowrank_singular_values(b, a, scale).tolist()
        dense = scale * (b.double() @ a.double())  # tiny model: the dense check is cheap here
        u, s, vh = torch.linalg.svd(dense)
        rows = []
        for k in range(1, a.shape[0] + 1):
            truncated = (u[:, :k] * s[:k]) @ vh[:k]
            rows.append((sum(x * x for x in sv[:k]) / sum(x * x for x in sv),
                         float(torch.linalg.norm(dense - truncated) / torch.linalg.norm(dense))))
        out[module] = rows
    return out
