"""The mixed-precision solve and its inputs, without Ray: budget, uniform baseline, sensitivity, recipe."""

from __future__ import annotations

import random

import pytest

from flows.mixed.sensitivity import format_weight, keeps_high, sensitivity
from flows.mixed.solve import BudgetTooSmall, Item, Option, solve, total
from flows.recipe import Recipe, RecipeError
from infra.sizes import parse_size


def _items(seed: int, count: int = 60) -> list[Item]:
    """Random tensors with the size/error trade-off of real candidates: more bits, less error."""
    rng = random.Random(seed)
    items = []
    for i in range(count):
        elements = rng.choice([4096, 16384, 65536])
        weight = rng.uniform(0.2, 4.0)
        options = []
        for c, bits_per_weight in enumerate((4.125, 4.25, 4.5, 8.0, 8.125)):
            error = rng.uniform(0.5, 1.5) * 2.0 ** (-2 * bits_per_weight)
            options.append(Option(candidate=c, damage=weight * error, bits=int(bits_per_weight * elements)))
        items.append(Item(key=f"t{i}", options=tuple(options)))
    return items


@pytest.mark.parametrize("seed", range(5))
def test_budget_is_never_exceeded_and_damage_falls_as_it_grows(seed: int) -> None:
    items = _items(seed)
    cheapest = sum(min(o.bits for o in item.options) for item in items)
    dearest = sum(max(o.bits for o in item.options) for item in items)
    previous = float("inf")
    for step in range(11):
        budget = cheapest + (dearest - cheapest) * step // 10
        damage, bits = total(items, solve(items, budget))
        assert bits <= budget
        assert damage <= previous * (1 + 1e-12)
        previous = damage


@pytest.mark.parametrize("seed", range(5))
def test_at_a_uniform_schemes_size_the_result_is_never_worse_than_it(seed: int) -> None:
    items = _items(seed)
    for candidate in range(5):
        uniform = [candidate] * len(items)
        damage, bits = total(items, uniform)
        chosen_damage, chosen_bits = total(items, solve(items, bits))
        assert chosen_bits <= bits
        assert chosen_damage <= damage


def test_a_budget_below_the_cheapest_choice_is_refused() -> None:
    items = _items(0, 4)
    cheapest = sum(min(o.bits for o in item.options) for item in items)
    with pytest.raises(BudgetTooSmall):
        solve(items, cheapest - 1)
    assert total(items, solve(items, cheapest))[1] == cheapest


def test_sensitivity_follows_role_and_depth() -> None:
    layers = 32
    mlp = sensitivity("model.layers.10.mlp.up_proj.weight", layers)
    routed = sensitivity("model.layers.10.mlp.experts.3.up_proj.weight", layers)
    shared = sensitivity("model.layers.10.mlp.shared_experts.up_proj.weight", layers)
    value = sensitivity("model.layers.10.self_attn.v_proj.weight", layers)
    # The calibrated order (flows.mixed.sensitivity): v over q/k/o, down over up over gate.
    assert value > sensitivity("model.layers.10.self_attn.q_proj.weight", layers)
    assert value > sensitivity("model.layers.10.self_attn.o_proj.weight", layers)
    assert sensitivity("model.layers.10.mlp.down_proj.weight", layers) > mlp
    assert mlp > sensitivity("model.layers.10.mlp.gate_proj.weight", layers)
    assert shared == mlp > routed and value > routed
    assert sensitivity("model.layers.10.attention.output.dense.weight", layers) < sensitivity(
        "model.layers.10.output.dense.weight", layers)  # BERT: attention output vs MLP output
    assert sensitivity("model.layers.0.mlp.up_proj.weight", layers) > mlp
    assert sensitivity("model.layers.31.mlp.up_proj.weight", layers) > mlp
    for name in ("lm_head", "model.embed_tokens", "model.layers.3.mlp.gate", "model.norm"):
        assert keeps_high(name), name
    assert not keeps_high("model.layers.3.mlp.gate_proj")


def test_integer_grids_below_8_bits_weigh_more() -> None:
    from quantizers import get_scheme

    int4, nvfp4 = format_weight(get_scheme("W4A16")), format_weight(get_scheme("NVFP4A16"))
    assert int4 > nvfp4 == format_weight(get_scheme("W8A16")) == format_weight(get_scheme("FP8")) == 1.0


def test_recipe_budget_fields(tmp_path) -> None:
    assert parse_size("120GB") == 120 * 10**9 and parse_size("500MiB") == 500 * 2**20
    for bad in ("1e400", "0", "0.5B", float("nan"), float("inf")):  # 1e400 was an OverflowError
        with pytest.raises(ValueError, match="size must be a positive, finite number of bytes"):
            parse_size(bad)  # type: ignore[arg-type]
    assert Recipe.preset("W4A16", target_size="1.5GB").target_size == 1_500_000_000
    # Unset budget fields add nothing to the plan key or the dump (earlier plan ids stay).
    plain = Recipe.preset("W4A16")
    assert not plain.mixed and "target_bits" not in plain.plan_key()
    assert "candidates" not in plain.model_dump()
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("scheme: W4A16\ntarget_size: 12XB\n")
    with pytest.raises(RecipeError, match=r"r.yaml: target_size: .*not a size: '12XB'"):
        Recipe.from_yaml(recipe_file)
    recipe_file.write_text("scheme: W4A16\ntarget_bits: 4.5\ntarget_size: 1GB\n")
    with pytest.raises(RecipeError, match="give one budget, not both"):
        Recipe.from_yaml(recipe_file)
    recipe_file.write_text("scheme: W4A16\ntarget_bits: 5\ncandidates: [{scheme: W4A16, group_size: 64}, "
                           "{scheme: FP8, method: search}]\n")
    recipe = Recipe.from_yaml(recipe_file)
    assert [(c.scheme, c.method) for c in recipe.candidate_choices()] == [("W4A16", "rtn"), ("FP8", "search")]
    defaults = Recipe.preset("W4A16", method="hqq", target_bits=5).candidate_choices()
    assert {c.method for c in defaults} == {"hqq"} and len(defaults) == 5
    # With the default method (rtn), NVFP4A16 is searched and the others stay RTN.
    plain = Recipe.preset("W4A16", target_bits=5).candidate_choices()
    assert [(c.scheme, c.method) for c in plain] == [
        ("W4A16", "rtn"), ("W4A16", "rtn"), ("NVFP4A16", "search"), ("W8A16", "rtn"), ("FP8", "rtn")]
    # 8-bit candidates at their cheapest stored form: one scale per output channel.
    assert [c.resolve().strategy for c in plain[3:]] == ["channel", "channel"]


def test_sweep_points_cover_methods_and_budgets() -> None:
    from flows.sweep import sweep_recipes

    points = sweep_recipes(["W4A16", "FP8"], ["rtn", "hqq"], [4.5, 6])
    assert [label for label, _ in points] == ["W4A16", "W4A16-HQQ", "FP8", "FP8-HQQ", "MIXED-4.5BITS",
                                              "MIXED-6BITS"]
    assert points[1][1].method == "hqq" and points[-1][1].target_bits == 6 and points[-1][1].mixed
    with pytest.raises(ValueError, match="unknown method 'gptq'"):
        sweep_recipes(["W4A16"], ["gptq"])
