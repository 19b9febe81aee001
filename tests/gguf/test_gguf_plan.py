"""GGUF planning, recipes and the split worker without llama.cpp: types, splits, resume, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from flows.gguf_output.plan import gguf_context
from flows.pipeline import plan_conversion
from flows.recipe import Recipe, RecipeError
from infra.errors import CheckpointError
from infra.gguf.tokenizer import pre_tokenizer_name
from infra.storage import open_storage
from tests.gguf.models import save_gguf_source
from workers.gguf_unit import convert_gguf_unit


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_gguf_source("llama", tmp_path_factory.mktemp("llama"), layers=8)


def test_recipe_takes_gguf_types_only_and_refuses_what_does_not_apply(tmp_path) -> None:
    assert Recipe.preset("q4_k_m", format="gguf").scheme == "q4_k_m"
    with pytest.raises(RecipeError, match="'W4A16' is not a GGUF type; GGUF schemes: F16, BF16, Q8_0"):
        Recipe.preset("W4A16", format="gguf")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("format: gguf\nscheme: Q4_K\noverrides: [{targets: [lm_head], scheme: Q8_0}]\n")
    with pytest.raises(RecipeError, match="overrides, ignore, method"):
        Recipe.from_yaml(recipe)
    # The default format adds nothing to the plan key: compressed-tensors plan ids do not change.
    assert "format" not in Recipe.preset("W4A16").plan_key()


def test_format_gguf_without_a_scheme_plans_q4_k_m(llama, capsys) -> None:
    # The compressed-tensors default (W4A16) was refused: "scheme 'W4A16' is not a GGUF type".
    from flows.cli import main

    assert main(["plan", str(llama), "--format", "gguf"]) == 0
    assert "GGUF Q4_K_M" in capsys.readouterr().out
    assert main(["plan", str(llama), "--format", "gguf", "--scheme", "Q8_0"]) == 0
    assert "GGUF Q8_0" in capsys.readouterr().out
    assert main(["plan", str(llama)]) == 0
    assert "recipe: W4A16" in capsys.readouterr().out


def test_plan_follows_llama_cpp_q4_k_m_rules(llama) -> None:
    plan = plan_conversion(str(llama), Recipe.preset("Q4_K_M", format="gguf"), shard_size=1 << 40)
    types = {job.gguf.name: job.gguf.type_name for job in plan.jobs() if job.gguf is not None}
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["output_norm.weight"] == types["blk.0.attn_norm.weight"] == "F32"
    # use_more_bits(i, 8): layers 0 (i < n/8), 7 (i >= 7n/8), 3 and 6 ((i - n/8) % 3 == 2).
    more = [i for i in range(8) if types[f"blk.{i}.attn_v.weight"] == "Q6_K"]
    assert more == [i for i in range(8) if types[f"blk.{i}.ffn_down.weight"] == "Q6_K"] == [0, 3, 6, 7]
    assert {types[f"blk.{i}.attn_q.weight"] for i in range(8)} == {"Q4_K"}


def test_split_is_written_at_planned_size_and_a_rerun_reuses_it(llama, tmp_path) -> None:
    plan = plan_conversion(str(llama), Recipe.preset("Q8_0", format="gguf"), shard_size=1_000_000)
    assert len(plan.units) >= 3
    count = len(plan.units)
    assert plan.units[-1].file_name == f"model-{count:05d}-of-{count:05d}.gguf"
    context = gguf_context(plan, open_storage(str(tmp_path)).uri(), "cpu")
    unit = plan.units[1]
    first = convert_gguf_unit(unit, context)
    written = tmp_path / unit.file_name
    reader = gguf.GGUFReader(str(written))
    assert reader.fields["split.no"].contents() == 1
    assert reader.fields["split.count"].contents() == len(plan.units)
    assert "tokenizer.ggml.tokens" not in reader.fields  # metadata and tokenizer: first split only
    assert sum(int(t.n_bytes) for t in reader.tensors) == unit.bytes_out
    again = convert_gguf_unit(unit, context)
    assert again.reused and again.sha256 == first.sha256 and not first.reused


def test_unsupported_architecture_and_missing_tokenizer_are_refused(llama, tmp_path) -> None:
    import shutil

    source = tmp_path / "src"
    shutil.copytree(llama, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="architecture GPT2LMHeadModel cannot be written as GGUF; "
                       "supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        plan_conversion(str(source), Recipe.preset("Q8_0", format="gguf"))
    (source / "config.json").write_text(json.dumps(config))
    plan = plan_conversion(str(source), Recipe.preset("Q8_0", format="gguf"), shard_size=1 << 40)
    (source / "tokenizer.json").unlink()
    # Planning refuses it (before, only the worker writing the first split did, while the others
    # converted on); a tokenizer deleted after planning is still refused by that worker.
    with pytest.raises(CheckpointError, match="tokenizer.json: missing; GGUF output needs the tokenizer"):
        plan_conversion(str(source), Recipe.preset("Q8_0", format="gguf"), shard_size=1 << 40)
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(CheckpointError, match="tokenizer.json: missing; GGUF output needs the tokenizer"):
        convert_gguf_unit(plan.units[0], gguf_context(plan, open_storage(str(staging)).uri(), "cpu"))
    assert not list(staging.glob("*.gguf"))


def test_pre_tokenizer_names() -> None:
    byte_level = {"type": "ByteLevel", "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}}) == "smollm"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}}) is None




def test_an_architecture_llama_cpp_cannot_run_is_refused_for_that_first() -> None:
    # MiniLM (BertModel) also lacks rms_norm_eps; the architecture is the reason to give.
    from flows.cli import bundled_model_path

    with pytest.raises(CheckpointError, match="architecture BertModel cannot be written as GGUF"):
        plan_conversion(bundled_model_path(), Recipe.preset("Q8_0", format="gguf"))
