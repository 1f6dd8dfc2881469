"""`lorakit serve`'s start-up without the network: --adapter registers each directory (a bad one stops the start
with its reason), --describe gives an adapter the description "model": "auto" routes by."""

from __future__ import annotations

import pytest
from server_helpers import make_adapter

from lorakit.cli.main import build_parser, main
from lorakit.cli.serve import build
from model_dirs import make_causal_lm_dir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_serve")
    model = make_causal_lm_dir(root / "model")
    return model, {name: make_adapter(model, root / name, seed) for seed, name in enumerate(("sql", "fr"))}


def test_describe_gives_auto_its_descriptions(dirs) -> None:
    model, adapters = dirs
    args = build_parser().parse_args(
        ["serve", "--model", str(model), "--adapter", f"sql={adapters['sql']}", "--adapter", f"fr={adapters['fr']}",
         "--describe", "sql=SQL queries over database tables: select, join, group by",
         "--describe", "fr=translation of English sentences into French"])
    engine, registry, _ = build(args)
    try:
        assert sorted(registry.names()) == ["fr", "sql"]
        assert registry.resolve("auto", "select the names from the users table joined with orders").served == "sql"
        assert registry.resolve("auto", "translate into French: good morning, my friend").served == "fr"
    finally:
        engine.shutdown(drain=False)
        registry.close()


def test_a_description_for_no_adapter_and_a_bad_adapter_stop_the_start(dirs, tmp_path, capsys) -> None:
    model, adapters = dirs
    assert main(["serve", "--model", str(model), "--port", "0", "--adapter", f"sql={adapters['sql']}",
                 "--describe", "other=text"]) == 2
    assert "--describe other=" in capsys.readouterr().err
    missing = tmp_path / "missing"
    assert main(["serve", "--model", str(model), "--port", "0", "--adapter", f"x={missing}"]) == 2
    err = capsys.readouterr().err
    assert "--adapter x=" in err and "missing" in err
