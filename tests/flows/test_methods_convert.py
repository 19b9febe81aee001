"""Methods through the whole pipeline: recipe -> plan -> workers -> manifest, then loaded back.

A tiny Qwen-shaped model (576-wide, so W4A16 mixes groups of 64 and 128) converted with RTN and
with each method: the method is recorded per tensor with its cost, every tensor's error is at or
below RTN's, the output loads in transformers, and a repeated conversion gives the same bytes.
"""

from __future__ import annotations

import json

import pytest

from flows.pipeline import run_conversion
from flows.recipe import Recipe, RecipeError
from infra.storage import open_storage
from tests.flows.conftest import file_digests
from tests.flows.test_convert_end_to_end import _causal_lm_kl

pytestmark = pytest.mark.usefixtures("local_ray")


def _tensors(dest) -> dict[str, dict]:  # noqa: ANN001
    manifest = json.loads((dest / "quantfleet.json").read_text())
    return {t["name"]: t for t in manifest["tensors"] if t["scheme"] is not None}


@pytest.fixture(scope="module")
def rtn(tiny_qwen, tmp_path_factory):  # noqa: ANN001, ANN201
    dest = tmp_path_factory.mktemp("rtn") / "out"
    run_conversion(str(tiny_qwen), str(dest), Recipe.preset("W4A16"), shard_size=2_000_000)
    return dest


@pytest.mark.parametrize("method", ["search", "hqq"])
def test_method_conversion_records_cost_beats_rtn_and_loads(tiny_qwen, rtn, tmp_path, method):
    dest = tmp_path / method
    summary = run_conversion(str(tiny_qwen), str(dest), Recipe.preset("W4A16", method=method),
                             shard_size=2_000_000)
    ours, theirs = _tensors(dest), _tensors(rtn)
    assert set(ours) == set(theirs)
    for name, record in ours.items():
        assert record["method"] == method and record["method_passes"] > 1
        assert record["sqnr_db"] >= theirs[name]["sqnr_db"], name
    assert sum(ours[n]["sqnr_db"] > theirs[n]["sqnr_db"] for n in ours) >= 0.95 * len(ours)
    # RTN manifests carry no method fields at all (byte-identical to before methods existed).
    assert all("method" not in t for t in theirs.values())
    # The same format: the config is RTN's, the plan (and so the version) is not.
    config = json.loads((dest / "config.json").read_text())["quantization_config"]
    assert config == json.loads((rtn / "config.json").read_text())["quantization_config"]
    assert summary.plan_id != json.loads((rtn / "quantfleet.json").read_text())["plan_id"]
    assert 0 < _causal_lm_kl(tiny_qwen, dest) <= _causal_lm_kl(tiny_qwen, rtn) * 1.05


def test_method_conversion_twice_gives_identical_bytes(tiny_qwen, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for dest in (first, second):
        run_conversion(str(tiny_qwen), str(dest), Recipe.preset("W4A16", method="hqq"), shard_size=2_000_000)
    assert file_digests(open_storage(first)) == file_digests(open_storage(second))


def test_override_method_and_unknown_method(tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text("scheme: W4A16\nmethod: search\noverrides:\n"
                           "  - targets: ['re:.*down_proj$']\n    scheme: W8A16\n    method: hqq\n")
    recipe = Recipe.from_yaml(recipe_file)
    assert recipe.choice_for("model.layers.0.mlp.down_proj.weight", (8, 8))[1] == "hqq"
    assert recipe.choice_for("model.layers.0.mlp.up_proj.weight", (8, 8))[1] == "search"
    # An RTN recipe's plan key is what it was before methods existed.
    assert "method" not in Recipe.preset("W4A16").plan_key()
    recipe_file.write_text("scheme: W4A16\nmethod: gptq\n")
    with pytest.raises(RecipeError, match="method: .*unknown method 'gptq'; valid methods: rtn, search, hqq"):
        Recipe.from_yaml(recipe_file)
