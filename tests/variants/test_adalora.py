"""AdaLoRA (lorakit.variants.adalora): the regulariser in the training loss, the budget schedule, masking by
importance across layers, and whole runs in lorakit's Trainer and transformers' Trainer that end at the target
budget and save PEFT's rank_pattern."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from conftest import Counting, max_abs_diff, tiny_llama, token_ids
from lorakit.errors import ConfigError
from lorakit.ops.adalora import budget_schedule
from lorakit.variants.adalora import AdaloraAdapter, adalora_adapters, final_ranks

TARGETS = ["q_proj", "v_proj"]  # 2 layers x 2 modules = 4 adapted modules


def adalora_config(**options) -> lorakit.LoraConfig:
    opts = {"total_step": 30, "tinit": 4, "tfinal": 6, "deltaT": 2, "target_r": 2, **options}
    return lorakit.LoraConfig(method="adalora", r=6, alpha=12.0, target_modules=TARGETS, options=opts)


def test_options_are_checked_and_total_step_is_required() -> None:
    with pytest.raises(ConfigError, match="total_step.*required"):
        lorakit.LoraConfig(method="adalora", target_modules=TARGETS)
    with pytest.raises(ConfigError, match="beta1"):
        adalora_config(beta1=1.5)
    with pytest.raises(ConfigError, match="no budgeting phase"):
        lorakit.attach(tiny_llama(), adalora_config(tinit=20, tfinal=10))


def test_starts_at_the_base_and_trains_r_times_k_plus_r_plus_d_per_layer() -> None:
    model, ids = tiny_llama(), token_ids()
    with torch.no_grad():
        base = model(ids).logits
    lorakit.attach(model, adalora_config())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # E = 0 at the start, as PEFT
    per_layer = {}
    for path, adapter in adalora_adapters(model, "default"):
        d, k = adapter.lora_B.shape[0], adapter.lora_A.shape[1]
        per_layer[path] = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
        assert per_layer[path] == 6 * k + 6 + d * 6
    assert len(per_layer) == 4


def test_orthogonality_regulariser_is_in_the_training_loss() -> None:
    model, ids = tiny_llama(), token_ids()
    lorakit.attach(model, adalora_config(orth_reg_weight=0.3))
    with torch.no_grad():
        model.eval()
        plain = model(ids, labels=ids).loss
        model.train()
        with_reg = model(ids, labels=ids).loss
    norms = []
    for _, adapter in adalora_adapters(model, "default"):
        a, b = adapter.lora_A.detach(), adapter.lora_B.detach()
        norms.append(torch.linalg.norm(a @ a.T - torch.eye(a.shape[0])))
        norms.append(torch.linalg.norm(b.T @ b - torch.eye(b.shape[1])))
    expected = 0.3 * torch.stack(norms).mean()
    assert expected > 0.1  # N(0, 0.02) factors are far from orthonormal
    assert abs((with_reg - plain).item() - expected.item()) < 1e-5
    model.train()
    model(ids, labels=ids).loss.backward()  # the regulariser's gradient reaches Q and P although E = 0
    assert all(a.lora_A.grad.abs().sum() > 0 for _, a in adalora_adapters(model, "default"))


def test_the_regulariser_is_counted_once_after_delete_and_attach_again() -> None:
    model, ids = tiny_llama(), token_ids()
    lorakit.attach(model, adalora_config(orth_reg_weight=0.3))
    lorakit.delete_adapter(model, "default")
    lorakit.attach(model, adalora_config(orth_reg_weight=0.2))
    with torch.no_grad():
        model.eval()
        plain = model(ids, labels=ids).loss
        model.train()
        with_reg = model(ids, labels=ids).loss
    norms = []
    for _, adapter in adalora_adapters(model, "default"):
        a, b = adapter.lora_A.detach(), adapter.lora_B.detach()
        norms += [torch.linalg.norm(a @ a.T - torch.eye(a.shape[0])), torch.linalg.norm(b.T @ b - torch.eye(b.shape[1]))]
    assert abs((with_reg - plain).item() - 0.2 * torch.stack(norms).mean().item()) < 1e-5


def test_no_regulariser_without_weight_or_in_eval() -> None:
    model, ids = tiny_llama(), token_ids()
    lorakit.attach(model, adalora_config(orth_reg_weight=0.0))
    model.train()
    with torch.no_grad():
        trained = model(ids, labels=ids).loss
        model.eval()
        assert torch.equal(model(ids, labels=ids).loss, trained)


@pytest.mark.parametrize(("step", "budget", "mask"), [
    (1, 96, False), (4, 96, False),  # warm-up: t <= tinit
    (10, 73, True),  # 64 + 32 (1 - 6/18)^3 = 73.48 -> 73, 10 % deltaT == 0
    (11, 71, False),  # 64 + 32 (1 - 7/18)^3 = 71.29, not a masking step
    (22, 64, True),  # t = T - tfinal: the target
    (25, 64, True),  # final phase
])
def test_budget_schedule_is_cubic_from_init_to_target(step: int, budget: int, mask: bool) -> None:
    assert budget_schedule(step, 96, 64, tinit=4, tfinal=8, total_step=30, delta_t=2) == (budget, mask)


def test_masking_keeps_the_top_budget_triplets_across_layers() -> None:
    model = lorakit.attach(tiny_llama(), adalora_config())
    hook = lorakit.training_hooks(model)[0]
    adapters = [a for _, a in adalora_adapters(model, "default")]
    gen = torch.Generator().manual_seed(3)
    hook.avg_ipt = [torch.rand(t.shape, generator=gen) for a in adapters for t in (a.lora_A, a.lora_E, a.lora_B)]
    hook.avg_unc = [torch.rand(t.shape, generator=gen) for t in hook.avg_ipt]
    scores = []  # triplet score: S(E_i) + mean_k S(A_ik) + mean_d S(B_di), S = Ī Ū
    for i in range(len(adapters)):
        s_a, s_e, s_b = (hook.avg_ipt[3 * i + j] * hook.avg_unc[3 * i + j] for j in range(3))
        scores.append(s_e.view(-1) + s_a.mean(1) + s_b.mean(0))
    flat = torch.cat(scores)
    keep = set(flat.argsort(descending=True)[:9].tolist())
    with torch.no_grad():
        for a in adapters:
            a.lora_E.fill_(1.0)
    hook.mask_to(9)
    kept = torch.cat([a.kept for a in adapters])
    assert set(kept.nonzero().flatten().tolist()) == keep
    assert sum(final_ranks(model).values()) == 9
    e = torch.cat([a.lora_E.detach().view(-1) for a in adapters])
    assert torch.equal(e != 0, kept)  # E = 0 exactly on the masked triplets


def _check_final(model, saved_dir) -> None:
    ranks = final_ranks(model)
    assert sum(ranks.values()) == 2 * len(ranks)  # target_r x modules
    data = json.loads((saved_dir / "adapter_config.json").read_text())
    assert data["peft_type"] == "ADALORA"
    pattern = data["rank_pattern"]
    assert {k.removesuffix(".lora_E") for k in pattern} == set(ranks)
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()} == ranks
    assert all(len(v) == 6 for v in pattern.values())
    # the file's tensors are cut to the kept triplets and load back with the same logits
    fresh = lorakit.load_adapter(tiny_llama(), saved_dir)
    model.eval()
    with torch.no_grad():
        assert max_abs_diff(fresh(token_ids()).logits, model(token_ids()).logits) <= 1e-5
    assert final_ranks(fresh) == ranks


def test_a_run_in_lorakits_trainer_ends_at_the_target_budget(tmp_path) -> None:
    from lorakit.train import TrainConfig, Trainer

    model = lorakit.attach(tiny_llama().train(), adalora_config())
    data = [{"input_ids": ids.tolist(), "labels": ids.tolist()} for ids in Counting().ids]
    cfg = TrainConfig(out=str(tmp_path / "run"), max_steps=30, learning_rate=1e-2, per_device_train_batch_size=8,
                      warmup_steps=0, diagnostics_steps=0, save_steps=0, logging_steps=0)
    result = Trainer(model, cfg, data).fit()
    assert result.steps == 30
    assert result.losses[-1] < result.losses[0]
    _check_final(model, result.saved_dir)


def test_a_run_in_transformers_trainer_with_the_step_callback(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    model = lorakit.attach(tiny_llama().train(), adalora_config())
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=30, per_device_train_batch_size=8,
                             learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                             disable_tqdm=True, save_strategy="no", seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Counting(), callbacks=[lorakit.AdapterStepCallback()])
    trainer.train()
    lorakit.save_adapter(model, tmp_path / "adapter")
    _check_final(model, tmp_path / "adapter")


def test_transformers_trainer_resumes_after_masking_with_the_hook_state(tmp_path) -> None:
    """AdapterStepCallback writes step_hooks.pt into Trainer's checkpoints and reads it back on resume: a run
    resumed after the first maskings ends with the uninterrupted run's masks and tensors."""
    from transformers import Trainer, TrainingArguments

    def run(out, resume=None):
        torch.manual_seed(0)
        model = lorakit.attach(tiny_llama().train(), adalora_config())
        args = TrainingArguments(output_dir=str(out), max_steps=30, per_device_train_batch_size=8,
                                 learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                                 disable_tqdm=True, save_strategy="steps", save_steps=12, seed=0,
                                 dataloader_num_workers=0)
        callbacks = [lorakit.AdapterStepCallback(), lorakit.AdapterCheckpointCallback()]
        Trainer(model=model, args=args, train_dataset=Counting(), callbacks=callbacks).train(
            resume_from_checkpoint=resume)
        return model

    whole = run(tmp_path / "whole")
    checkpoint = tmp_path / "whole" / "checkpoint-12"
    assert (checkpoint / "step_hooks.pt").is_file()
    saved = torch.load(checkpoint / "step_hooks.pt", weights_only=True)
    assert not all(bool(k.all()) for k in saved[0]["kept"])  # masks were set by step 12
    resumed = run(tmp_path / "whole", resume=str(checkpoint))
    assert final_ranks(resumed) == final_ranks(whole)
    for (_, a), (_, b) in zip(adalora_adapters(whole, "default"), adalora_adapters(resumed, "default")):
        assert torch.equal(a.kept, b.kept)
        for x, y in ((a.lora_A, b.lora_A), (a.lora_E, b.lora_E), (a.lora_B, b.lora_B)):
            torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_not_mixable_swappable_or_combinable() -> None:
    abilities = AdaloraAdapter.abilities
    assert not (abilities.low_rank or abilities.mixed_batches or abilities.hot_swap or abilities.combine)
    assert abilities.merge and abilities.step_hook


def test_inspect_reports_the_kept_ranks_and_the_true_update(tmp_path, capsys) -> None:
    from lorakit.analysis import adapter_report
    from lorakit.cli.main import main

    model = lorakit.attach(tiny_llama(), adalora_config())
    adapters = [a for _, a in adalora_adapters(model, "default")]
    with torch.no_grad():
        for i, a in enumerate(adapters):
            a.lora_E.normal_()
            a.set_kept(torch.arange(6) < i + 2)  # kept ranks 2, 3, 4, 5
    lorakit.save_adapter(model, tmp_path)
    report = adapter_report(tmp_path)
    rows = {m["module"]: m for m in report["modules"]}
    assert {p: m["r"] for p, m in rows.items()} == final_ranks(model) == dict(zip(rows, [2, 3, 4, 5]))
    assert not report["warnings"]
    for path, adapter in adalora_adapters(model, "default"):
        norm = torch.linalg.norm(adapter.delta_weight(model.get_submodule(path).base_layer)).item()
        assert abs(rows[path]["delta_fro_norm"] - norm) <= 1e-5 * max(1.0, norm)
    assert main(["inspect", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.self_attn.v_proj" in printed


def test_the_batched_regulariser_equals_the_layer_by_layer_sum() -> None:
    """Layers of several shapes (stacked by shape) and a rank-0 layer: the mean of the per-matrix penalties."""
    from lorakit.ops.adalora import orth_penalty, orth_regulariser

    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 12, 9), (4, 12, 9), (4, 7, 12), (3, 12, 9), (0, 5, 5)]  # (r, k, d)
    pairs = [(torch.randn(r, k, generator=gen, dtype=torch.float64).requires_grad_(),
              torch.randn(d, r, generator=gen, dtype=torch.float64).requires_grad_()) for r, k, d in shapes]
    expected = torch.stack([orth_penalty(a, b) for a, b in pairs]).sum() / (2 * len(pairs))
    got = orth_regulariser(pairs)
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-6, atol=1e-6)
    got.backward()
    grads = [p.grad.clone() for pair in pairs for p in pair]
    for pair in pairs:
        for p in pair:
            p.grad = None
    expected.backward()
    for g, pair_p in zip(grads, [p for pair in pairs for p in pair]):
        torch.testing.assert_close(g.double(), pair_p.grad.double(), rtol=1e-5, atol=1e-6)
