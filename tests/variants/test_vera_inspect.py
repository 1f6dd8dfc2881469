"""`lorakit inspect` of a VeRA file: per module, the singular values and norms of the true update
ΔW = diag(λ_b) B[:d] diag(λ_d) A[:, :k] (with the saved projection or one drawn again from the key); the layers'
input sizes come from the base model, which a VeRA file does not record."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_vera import randomize, vera_config, vera_layers

import lorakit
from conftest import tiny_llama
from lorakit.analysis import adapter_report
from lorakit.cli.main import main
from lorakit.errors import AdapterFileError


@pytest.mark.parametrize("save_projection", [True, False])
def test_inspect_reports_the_true_update_of_each_layer(save_projection: bool, tmp_path: Path, capsys) -> None:
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_llama().save_pretrained(base_dir)
    model = tiny_llama()
    lorakit.attach(model, vera_config(options={"projection_prng_key": 3, "save_projection": save_projection}))
    randomize(model)
    lorakit.save_adapter(model, adapter_dir)
    report = adapter_report(adapter_dir, model_dir=base_dir)
    rows = {m["module"]: m for m in report["modules"]}
    layers = vera_layers(model)
    assert set(rows) == {layer.path for layer, _ in layers} and not report["warnings"]
    for layer, adapter in layers:
        delta = adapter.delta_weight(layer.base_layer).double()
        expected = torch.linalg.svdvals(delta)[: adapter.r]
        row = rows[layer.path]
        assert (row["d"], row["k"], row["r"]) == (adapter.out_features, adapter.in_features, adapter.r)
        torch.testing.assert_close(torch.tensor(row["singular_values"], dtype=torch.float64), expected,
                                   rtol=1e-4, atol=1e-6)
        weight = layer.base_layer.weight.double()
        assert row["ratio_to_weight"] == pytest.approx(
            (torch.linalg.norm(delta) / torch.linalg.norm(weight)).item(), rel=1e-4)
    assert main(["inspect", str(adapter_dir), "--model", str(base_dir)]) == 0
    assert "down_proj" in capsys.readouterr().out


def test_inspect_of_a_vera_file_without_the_model_names_what_is_missing(tmp_path: Path, capsys) -> None:
    model = tiny_llama()
    lorakit.attach(model, vera_config())
    lorakit.save_adapter(model, tmp_path)
    with pytest.raises(AdapterFileError, match=r"input size.*--model"):
        adapter_report(tmp_path)
    assert main(["inspect", str(tmp_path)]) != 0
    assert "--model" in capsys.readouterr().err
