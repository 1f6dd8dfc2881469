"""The settings of the embedded demo (`lorakit train` with no model and no data, and `--methods` for the family):
everything that decides its result, in one dataclass. compare.py runs them; family.py turns them into each
method's learning rate, epochs, rank and options."""

from __future__ import annotations

from dataclasses import dataclass, field

from .stdlib_docs import DEFAULT_PACKAGES

# LoRA (r=8) on the query, value and attention-output projections and the feed-forward up-projection of
# the 6 layers (0.90% of the parameters with the classifier head, which trains in full as modules_to_save).
# Measured on this task: LoRA on query, key, value and attention output only (0.69%) stays ~6 points below
# full fine-tuning; adding the feed-forward layer closes the gap. all-linear would be 1.5%. The pooler is
# left frozen: LoRA on it changed nothing measurable and its update grows past the weight's norm.
LORA_TARGETS = ["query", "value", "attention.output.dense", "intermediate.dense"]


@dataclass
class DemoSettings:
    """Everything that decides the demo's result. The defaults are the embedded default run."""

    packages: tuple[str, ...] = DEFAULT_PACKAGES
    max_train_per_label: int | None = 160
    max_test_per_label: int | None = 60
    max_length: int = 32  # word-piece tokens per docstring (the median docstring has 14; 90% have <= 30)
    batch_size: int = 16
    eval_batch_size: int = 64
    warmup_ratio: float = 0.06
    lr_scheduler_type: str = "linear"  # linear | cosine | constant (after warm-up)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # LoRA
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    lora_learning_rate: float = 2e-3
    lora_epochs: float = 8.0  # LoRA learns with fewer parameters: more epochs (as in the LoRA paper's GLUE runs)
    # full fine-tuning
    full_learning_rate: float = 1e-4
    full_epochs: float = 4.0
    device: str = "auto"  # lorakit train's --device: auto (CUDA when there is one) | cpu | cuda | cuda:N
    # the rest of the family (--methods; see family.plan). DoRA and LoRA-FA train exactly as LoRA above (r, alpha,
    # dropout, lr, epochs): DoRA only adds a magnitude vector, LoRA-FA only freezes A; the others as follows.
    # VeRA: r=256 is PEFT's VeraConfig default (the paper's GLUE runs use r=1024; its shared A, B are frozen, so a
    # larger r adds compute, not trainable parameters). Its trained vectors need a larger learning rate than LoRA's
    # A, B (the paper tunes them at several times LoRA's rate); 4e-3 is twice LoRA's here. d_initial 0.1: PEFT's
    # default (and the paper's). Same epochs as LoRA.
    vera_r: int = 256
    vera_learning_rate: float = 4e-3
    vera_d_initial: float = 0.1
    # AdaLoRA: init_r 12 -> target_r 8 are PEFT's AdaLoraConfig defaults; the final average rank is LoRA's r. alpha is
    # scaled so that s = alpha / init_r equals LoRA's alpha / r. The schedule is a share of the run's steps, shaped
    # as PEFT's AdaLoraConfig example (tinit 10, tfinal 20 of 100 steps); a masking every 1% of the steps (AdaLoRA's
    # GLUE scripts mask every 100 of ~10^4 steps). total_step: the run's own (lorakit.train.loop fills it in).
    adalora_init_r: int = 12
    adalora_target_r: int = 8
    adalora_tinit_fraction: float = 0.1
    adalora_tfinal_fraction: float = 0.2
    adalora_deltaT_fraction: float = 0.01
    # Delta-LoRA: lambda 0.5 (the paper's and lorakit's default); W0 starts moving a quarter into the run, once the
    # warm-up (6%) is over and B A has left its zero start (the paper's K=500 is for much longer runs); dropout 0
    # (Delta-LoRA refuses dropout, as the paper trains without).
    delta_lambda: float = 0.5
    delta_start_fraction: float = 0.25

    def for_method(self, method: str) -> tuple[float, float]:
        """(learning rate, epochs) of a run: full fine-tuning's, VeRA's, or LoRA's (every other adapter)."""
        if method == "full":
            return self.full_learning_rate, self.full_epochs
        if method == "vera":
            return self.vera_learning_rate, self.lora_epochs
        return self.lora_learning_rate, self.lora_epochs


QUICK = DemoSettings(packages=("email", "logging"), max_train_per_label=50, max_test_per_label=20,
                     max_length=32, lora_epochs=1.0, full_epochs=1.0)


__all__ = ["LORA_TARGETS", "QUICK", "DemoSettings"]
