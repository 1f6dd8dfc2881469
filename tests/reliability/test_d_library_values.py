"""The checks behind the CLI table hold for the Python API too: TrainConfig, generation and the quickstart refuse
the same values with a ConfigError naming the option, before any work."""

from __future__ import annotations

import math

import pytest

from lorakit.errors import ConfigError
from lorakit.generation import check_generation_options
from lorakit.quickstart import run as run_quickstart
from lorakit.train.config import TrainConfig


@pytest.mark.parametrize("field, value", [
    ("seed", -1), ("seed", 2**64), ("seed", 2**32), ("epochs", math.inf), ("learning_rate", math.inf),
    ("weight_decay", math.nan), ("max_grad_norm", math.inf), ("loraplus_ratio", math.inf), ("max_steps", 0),
    ("max_steps", -5), ("device", "tpu"), ("device", "meta"), ("device", "cuda:x"),
])
def test_train_config_refuses_the_value_by_name(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_train_config_keeps_the_values_that_mean_something():
    cfg = TrainConfig(seed=2**32 - 1, max_steps=-1, device="cuda:3", epochs=2.5)
    assert (cfg.seed, cfg.max_steps, cfg.device, cfg.epochs) == (2**32 - 1, -1, "cuda:3", 2.5)


@pytest.mark.parametrize("options, name", [
    ({"temperature": math.nan}, "temperature"), ({"temperature": math.inf}, "temperature"),
    ({"temperature": -0.5}, "temperature"), ({"top_p": math.nan}, "top_p"), ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"), ({"max_new_tokens": True}, "max_new_tokens"),
])
def test_generation_options_refuse_the_value_by_name(options, name):
    with pytest.raises(ConfigError, match=name):
        check_generation_options(**options)


@pytest.mark.parametrize("kwargs, name", [
    ({"steps": 0}, "steps"), ({"steps": -3}, "steps"), ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"),
    ({"log_every": 0}, "log_every"),
])
def test_quickstart_refuses_before_any_work(tmp_path, kwargs, name):
    with pytest.raises(ConfigError, match=name):
        run_quickstart(out_dir=tmp_path / "qs", **kwargs)
    assert not (tmp_path / "qs").exists()


def test_quickstart_refuses_an_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ConfigError, match="a_file"):
        run_quickstart(out_dir=tmp_path / "a_file", steps=1)
