"""`quantfleet sweep` on a small Llama-shaped model and on MiniLM: 8 bits beat 4 bits, figures finite."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from flows.cli import main
from flows.sweep import SweepResult, run_sweep

pytestmark = pytest.mark.usefixtures("local_ray")


def _by_scheme(result: SweepResult) -> dict[str, object]:
    return {p.scheme: p for p in result.points}


def _layer_errors(dest_uri: str) -> dict[str, float]:
    from infra.storage import open_storage

    data = json.loads(open_storage(dest_uri).read_bytes("quantfleet.json"))
    return {t["name"]: t["output_error"] for t in data["tensors"] if t["scheme"]}


def test_sweep_orders_schemes_on_a_llama_shaped_model(tiny_llama, tmp_path) -> None:
    out = tmp_path / "sweep"
    result = run_sweep(str(tiny_llama), ["W8A16", "W4A16", "FP8"], out, max_tokens=512, context=256,
                       shard_size=2_000_000)
    points = _by_scheme(result)
    w8, w4, fp8 = points["W8A16"], points["W4A16"], points["FP8"]
    for p in (w8, w4, fp8):
        e = p.evaluation
        assert all(math.isfinite(v) for v in e.figures().values()), e
        assert p.probe_error_rms is not None and math.isfinite(p.probe_error_rms)
    assert 0 < w8.evaluation.mean_kl < w4.evaluation.mean_kl
    assert w8.evaluation.top1 >= w4.evaluation.top1
    assert w4.bits_per_weight < w8.bits_per_weight
    e8, e4 = _layer_errors(w8.dest_uri), _layer_errors(w4.dest_uri)
    assert e8.keys() == e4.keys() and all(e8[k] < e4[k] for k in e8)
    for name in ("sweep.md", "sweep.json", "sweep.png", "correlation.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "sweep.png").read_bytes().startswith(b"\x89PNG")
    markdown = (out / "sweep.md").read_text()
    assert "| W8A16 |" in markdown and "Spearman" in markdown
    assert result.rank_correlation is not None and result.rank_correlation > 0


def test_cli_sweep_on_minilm_orders_schemes_by_embedding_cosine(minilm, tmp_path, capsys) -> None:
    out = tmp_path / "minilm"
    code = main(["sweep", minilm, "--schemes", "W8A16,W4A16", "--out", str(out), "--max-tokens", "512",
                 "--context", "128", "--shard-size", "50MB"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "W8A16:" in printed and "sweep.md" in printed
    data = SweepResult.model_validate_json((out / "sweep.json").read_text())
    points = _by_scheme(data)
    w8, w4 = points["W8A16"], points["W4A16"]
    assert w8.evaluation.kind == "encoder"
    assert 0 < w8.quality < w4.quality < 0.1
    assert w8.evaluation.hidden_cosine > w4.evaluation.hidden_cosine
    assert all(math.isfinite(v) for p in (w8, w4) for v in p.evaluation.figures().values())
    e8, e4 = _layer_errors(w8.dest_uri), _layer_errors(w4.dest_uri)
    assert all(e8[k] < e4[k] for k in e8)
    # Re-running into the same folder (its sweep.* files and OUT/<SCHEME>/ versions are
    # quantfleet's own) reuses the published conversion instead of refusing the folder.
    shards = sorted((out / "W8A16").glob("*.safetensors"))
    published = [p.stat().st_mtime_ns for p in shards]
    assert main(["sweep", minilm, "--schemes", "W8A16", "--out", str(out), "--max-tokens", "512",
                 "--context", "128", "--shard-size", "50MB"]) == 0
    assert shards and [p.stat().st_mtime_ns for p in shards] == published
    assert [p.scheme for p in SweepResult.model_validate_json((out / "sweep.json").read_text()).points] \
        == ["W8A16"]


def test_cli_sweep_does_not_reuse_a_point_made_from_another_model(minilm, tmp_path, capsys) -> None:
    # Sweeping another model (a fine-tune of the same base, say) into a folder an earlier sweep
    # used charted the earlier model's points as this one's: the reuse looked at the marker only.
    source = tmp_path / "minilm"
    shutil.copytree(minilm, source)
    out = tmp_path / "sweep"
    options = ["--schemes", "W8A16", "--out", str(out), "--max-tokens", "256", "--context", "128",
               "--shard-size", "50MB"]
    assert main(["sweep", str(source), *options]) == 0
    capsys.readouterr()

    assert main(["sweep", minilm, *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"quantfleet: error: file://{out}/W8A16: already holds a published conversion "
                          "(plan "), err
    assert f": W8A16 of file://{source}); choose another destination" in err, err

    weights = source / "model.safetensors"  # the same model, rewritten since
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert main(["sweep", str(source), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"quantfleet: error: file://{out}/W8A16: already holds this recipe's conversion "
                          f"of an earlier state of file://{source} (plan "), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_sweep_rejects_an_unknown_scheme_in_one_line(minilm, tmp_path, capsys) -> None:
    assert main(["sweep", minilm, "--schemes", "W8A16,W3A16", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantfleet: error:") and "W3A16" in err and err.count("\n") == 1


def test_cli_sweep_without_a_tokenizer_is_refused_before_converting(minilm, tmp_path, capsys) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    # tokenizer_config.json alone is no tokenizer
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (bare / name).write_bytes((Path(minilm) / name).read_bytes())
    out = tmp_path / "sweep"
    assert main(["sweep", str(bare), "--schemes", "W8A16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"quantfleet: error: file://{bare}: no tokenizer files"), err
    assert err.count("\n") == 1, err
    assert not out.exists()
