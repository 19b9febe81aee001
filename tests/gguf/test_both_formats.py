"""Both formats from one recipe (`gguf:` / `--gguf`): one version holds the compressed-tensors
checkpoint and, in `gguf/`, the GGUF of the same source, published by one commit.

- The recipe field: a GGUF type only, not with `format: gguf`; absent, plan ids are unchanged.
- Without Prefect: transformers loads the version, llama.cpp loads `gguf/` as one model from its
  splits and generates, `verify` re-hashes both halves, the manifest and report cover both.
- A re-run after a run that stopped before publishing reuses every unit of both halves and
  publishes the same bytes.
- The default (Prefect) mode publishes both; `sync` puts both under one version and moves LATEST.
- A source the GGUF half cannot write is refused with one line before anything runs (Prefect mode).
- With `evaluate:`, both halves are evaluated against the original and gated before publishing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flows.pipeline import convert_units, plan_conversion, run_conversion
from flows.recipe import Recipe, RecipeError
from infra.publish import DEFAULT_MARKER
from tests.gguf.models import save_gguf_source, unsupported_copy
from tests.llamacpp import llama_cpp, llama_cpp_unavailable

pytestmark = pytest.mark.usefixtures("local_ray")
needs_llama_cpp = pytest.mark.skipif(bool(llama_cpp_unavailable()), reason=llama_cpp_unavailable() or "-")
SHARD = 400_000  # several units in each half


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_gguf_source("llama", tmp_path_factory.mktemp("llama-both"), layers=2, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def both(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted both-formats conversion, without Prefect."""
    dest = tmp_path_factory.mktemp("both") / "out"
    run_conversion(str(llama), str(dest), Recipe.preset("W4A16", gguf="q8_0"), shard_size=SHARD)
    return dest


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_recipe_field_takes_a_gguf_type_and_keeps_other_plan_ids(llama: Path) -> None:
    assert Recipe.preset("W4A16", gguf="q4_k_m").gguf == "Q4_K_M"
    with pytest.raises(RecipeError, match="not a GGUF type"):
        Recipe.preset("W4A16", gguf="W4A16")
    with pytest.raises(RecipeError, match="the scheme already is the GGUF type"):
        Recipe.preset("Q4_K_M", format="gguf", gguf="Q8_0")
    plain = plan_conversion(str(llama), Recipe.preset("W4A16"), shard_size=SHARD)
    paired = plan_conversion(str(llama), Recipe.preset("W4A16", gguf="Q8_0"), shard_size=SHARD)
    assert plain.gguf is None and "gguf" not in plain.recipe.plan_key()
    assert paired.gguf is not None and paired.gguf.recipe.scheme == "Q8_0"
    # The compressed-tensors half is the same conversion; the version names the pair.
    assert [u.jobs for u in paired.units] == [u.jobs for u in plain.units]
    assert paired.plan_id != plain.plan_id
    assert len(paired.gguf.units) >= 2


@needs_llama_cpp
def test_both_formats_publish_in_one_version_and_each_loads(llama: Path, both: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.versions import verify_uri

    splits = sorted(p.name for p in (both / "gguf").glob("*.gguf"))
    assert len(splits) >= 2 and splits[0] == f"model-00001-of-{len(splits):05d}.gguf"
    assert list(both.glob("model*.safetensors")) and not list(both.glob("*.gguf"))
    marker = json.loads((both / DEFAULT_MARKER).read_text())
    listed = json.dumps(marker)
    assert all(f"gguf/{name}" in listed for name in splits)
    manifest = json.loads((both / "quantfleet.json").read_text())
    assert [s["file"] for s in manifest["gguf"]["splits"]] == [f"gguf/{n}" for n in splits]
    assert manifest["gguf"]["type"] == "Q8_0" and manifest["recipe"]["gguf"] == "Q8_0"
    assert all(t["sqnr_db"] > 30 for t in manifest["gguf"]["tensors"] if t["scheme"] == "GGUF Q8_0")
    report = (both / "report.md").read_text()
    assert "## GGUF Q8_0 (in `gguf/`" in report and "### GGUF per-tensor metrics" in report
    assert all(r.ok for r in verify_uri(str(both)))  # every file of both halves re-hashed

    tokenizer = AutoTokenizer.from_pretrained(llama)
    tokens = tokenizer("The for statement iterates over a sequence")["input_ids"]
    original = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(both, dtype=torch.float32)
    with torch.no_grad():
        want = original(torch.tensor([tokens])).logits
        got = converted(torch.tensor([tokens])).logits
    assert torch.nn.functional.cosine_similarity(want.flatten(), got.flatten(), dim=0) > 0.9

    model = llama_cpp().Llama(str(both / "gguf" / splits[0]), n_ctx=128, n_threads=2)
    try:
        assert model.n_layer == 2 and model.n_vocab == 1024
        assert model.generate("The for statement", max_tokens=4, temperature=0.0, seed=0)
    finally:
        model.close()


def test_a_rerun_reuses_both_halves_and_publishes_the_same_bytes(llama: Path, both: Path,
                                                                 tmp_path: Path) -> None:
    dest = tmp_path / "out"
    plan = plan_conversion(str(llama), Recipe.preset("W4A16", gguf="Q8_0"), shard_size=SHARD)
    # A run that stopped after converting, before publishing: everything is staged, nothing public.
    convert_units(plan, str(dest))
    convert_units(plan, str(dest), gguf_half=True)
    assert not (dest / DEFAULT_MARKER).exists() and not (dest / "gguf").exists()
    reused: list[bool] = []
    run_conversion(str(llama), str(dest), Recipe.preset("W4A16", gguf="Q8_0"), shard_size=SHARD,
                   on_done=lambda unit, result: reused.append(result.reused))
    assert len(reused) == len(plan.units) + len(plan.gguf.units) and all(reused)
    ours, theirs = _files(dest), _files(both)
    model_files = {k for k in theirs if k.endswith((".safetensors", ".gguf", "config.json"))}
    assert {k: ours[k] for k in model_files} == {k: theirs[k] for k in model_files}


@pytest.mark.slow
def test_default_mode_and_sync_publish_both_under_one_version(llama: Path, both: Path,
                                                              tmp_path: Path) -> None:
    from flows.sync import run_sync
    from flows.versions import read_latest
    from infra.storage import open_storage
    from tests.flows.test_cli import run_cli

    dest = tmp_path / "cli"
    done = run_cli("convert", str(llama), str(dest), "--scheme", "W4A16", "--gguf", "Q8_0",
                   "--shard-size", str(SHARD))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "GGUF: " in done.stdout
    assert _files(dest / "gguf") == _files(both / "gguf")

    tree = tmp_path / "models"
    shutil.copytree(llama, tree / "tiny-llama")
    recipe = tmp_path / "both.yaml"
    recipe.write_text("name: w4a16-q8\nscheme: W4A16\ngguf: Q8_0\n")
    summary = run_sync(str(tree), str(tmp_path / "published"), [str(recipe)], shard_size=SHARD)
    (outcome,) = summary.outcomes
    assert outcome.status == "converted" and outcome.latest_moved, outcome.reason
    version = tmp_path / "published" / "tiny-llama" / "w4a16-q8" / str(outcome.version)
    assert (version / DEFAULT_MARKER).exists() and (version / "config.json").exists()
    assert sorted(p.name for p in (version / "gguf").glob("*.gguf")) == sorted(
        p.name for p in (both / "gguf").glob("*.gguf"))
    card = (version / "README.md").read_text()
    assert "in `gguf/`" in card and "- GGUF Q8_0" in card
    latest = read_latest(open_storage(str(tmp_path / "published")), "tiny-llama", "w4a16-q8")
    assert latest is not None and latest.version == outcome.version


def test_a_source_the_gguf_half_cannot_write_is_refused_in_one_line(llama: Path, tmp_path: Path) -> None:
    from tests.flows.test_cli import run_cli

    source = unsupported_copy(llama, tmp_path / "falcon")
    dest = tmp_path / "out"
    done = run_cli("convert", str(source), str(dest), "--scheme", "W4A16", "--gguf", "Q4_K_M")  # Prefect mode
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("quantfleet: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "FalconForCausalLM cannot be written as GGUF" in lines[0]
    assert not dest.exists() or not any(dest.rglob("*"))


def test_both_halves_are_evaluated_and_gated(llama: Path, tmp_path: Path) -> None:
    from flows.gates import QualityGateFailed

    evaluate = {"enabled": True, "max_tokens": 256, "context": 128}
    dest = tmp_path / "out"
    summary = run_conversion(str(llama), str(dest), Recipe.preset("W4A16", gguf="Q8_0", evaluate=evaluate),
                             shard_size=SHARD)
    manifest = json.loads((dest / "quantfleet.json").read_text())
    assert summary.evaluation is not None and manifest["evaluation"]["kind"] == "causal-lm"
    # Q8_0 keeps far more than int4: the GGUF half's KL is the smaller one.
    assert 0 <= manifest["gguf"]["evaluation"]["mean_kl"] < manifest["evaluation"]["mean_kl"]
    assert "### GGUF model evaluation against the original" in (dest / "report.md").read_text()

    # A gate only the GGUF half fails still keeps the whole version in staging.
    gguf_kl = manifest["gguf"]["evaluation"]["mean_kl"]
    strict = Recipe.preset("Q8_0", format="gguf").gates.model_copy(update={"max_mean_kl": gguf_kl / 2})
    with pytest.raises(QualityGateFailed, match="GGUF max_mean_kl"):
        run_conversion(str(llama), str(tmp_path / "gated"),
                       Recipe.preset("W8A16", gguf="Q4_K", evaluate=evaluate, gates=strict), shard_size=SHARD)
    assert not (tmp_path / "gated" / DEFAULT_MARKER).exists()
