"""Mixed precision through the whole pipeline: measure on Ray, solve, convert, publish, load back.

A tiny Llama (two layers) converted at a budget between 4- and 8-bit schemes: the result stays
within the budget, mixes config groups, loads in transformers with weights equal to our
dequantizer's, is no worse than the uniform scheme of the same size, and a resumed run (the
measure pass redone from scratch) publishes the same bytes. A bad budget is one clear line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flows.cli import main
from flows.mixed import planner
from flows.pipeline import convert_units, plan_conversion, run_conversion
from flows.recipe import Recipe
from infra.storage import open_storage
from quantizers import dequantize
from quantizers.config import config_groups
from tests.flows.conftest import file_digests
from tests.flows.test_cli import run_cli
from tests.flows.test_convert_end_to_end import _causal_lm_kl

pytestmark = pytest.mark.usefixtures("local_ray")
SHARD = 1_000_000  # several units, so the measure pass and the resume cover more than one


def _manifest(dest: Path) -> dict:
    return json.loads((dest / "quantfleet.json").read_text())


@pytest.fixture(scope="module")
def mixed(tiny_llama, tmp_path_factory):  # noqa: ANN001, ANN201
    dest = tmp_path_factory.mktemp("mixed") / "out"
    summary = run_conversion(str(tiny_llama), str(dest), Recipe.preset("W4A16", target_bits=5.0),
                             shard_size=SHARD)
    return dest, summary


def test_within_budget_mixed_groups_and_reported(mixed) -> None:  # noqa: ANN001
    dest, summary = mixed
    manifest = _manifest(dest)
    assert manifest["totals"]["bits_per_weight"]["quantized"] <= 5.0
    chosen = manifest["mixed"]
    assert chosen["bits_used"] <= chosen["budget_bits"]
    assert len({t["candidate"] for t in chosen["tensors"]}) >= 2  # really mixed
    config = json.loads((dest / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) >= 2
    assert "## Mixed precision" in summary.report and (dest / "mixed_precision.png").stat().st_size > 0
    # The plan's choice is what was stored: each tensor's scheme is its config group's.
    stored = {t["name"]: t["scheme"] for t in manifest["tensors"] if t["scheme"] is not None}
    assert set(stored) == {t["name"] for t in chosen["tensors"]}
    # Fusion partners share one scheme (engines fuse q/k/v and gate/up into one matmul).
    for layer in (0, 1):
        prefix = f"model.layers.{layer}"
        assert len({stored[f"{prefix}.self_attn.{p}_proj.weight"] for p in "qkv"}) == 1
        assert len({stored[f"{prefix}.mlp.{p}_proj.weight"] for p in ("gate", "up")}) == 1


def test_loads_in_transformers_with_our_dequantized_weights(mixed, tiny_llama) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    dest, _ = mixed
    ids = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.bfloat16).eval()
        assert torch.isfinite(model(ids).logits).all()  # the first forward decompresses
    weights = model.state_dict()
    config = json.loads((dest / "config.json").read_text())
    groups = config_groups(config["quantization_config"])
    checked = 0
    handle = _Index(dest)
    for group in groups:
        for module in group.targets:
            stored = {key.rsplit(".", 1)[1]: handle.get_tensor(key) for key in handle.keys()
                      if key.rsplit(".", 1)[0] == module}
            expected = dequantize(stored, group.scheme)
            assert torch.equal(weights[f"{module}.weight"].to(expected.dtype), expected), module
            checked += 1
    assert checked == 14


class _Index:
    """The tensors of a sharded checkpoint through one `get_tensor`/`keys` interface."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.exists():
            names = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(str(folder / "model.safetensors"), "pt") as handle:
                names = dict.fromkeys(handle.keys(), "model.safetensors")
        self._files = {name: folder / file for name, file in names.items()}

    def keys(self) -> list[str]:
        return list(self._files)

    def get_tensor(self, name: str) -> torch.Tensor:
        with safe_open(str(self._files[name]), "pt") as handle:
            return handle.get_tensor(name)


def test_at_a_uniform_schemes_size_it_is_not_worse(tiny_llama, tmp_path) -> None:  # noqa: ANN001
    uniform_dest = tmp_path / "uniform"
    uniform = run_conversion(str(tiny_llama), str(uniform_dest), Recipe.preset("W4A16", group_size=64),
                             shard_size=SHARD)
    same_size = Recipe.preset("W4A16", target_size=uniform.bytes_out)
    plan = plan_conversion(str(tiny_llama), same_size, shard_size=SHARD)
    assert plan.bytes_out <= uniform.bytes_out
    assert plan.mixed is not None
    baseline = next(p for p in plan.mixed.uniform if p.candidate.startswith("W4A16 int4 sym group 64"))
    assert plan.mixed.damage <= baseline.damage
    mixed_dest = tmp_path / "mixed"
    run_conversion(str(tiny_llama), str(mixed_dest), same_size, shard_size=SHARD)
    assert _causal_lm_kl(tiny_llama, mixed_dest) <= _causal_lm_kl(tiny_llama, uniform_dest)


def test_a_resumed_run_measures_again_and_publishes_the_same_bytes(mixed, tiny_llama, tmp_path) -> None:  # noqa: ANN001
    dest = tmp_path / "resumed"
    recipe = Recipe.preset("W4A16", target_bits=5.0)
    planner._MEASURED.clear()  # a new driver process: nothing remembered
    plan = plan_conversion(str(tiny_llama), recipe, shard_size=SHARD)
    assert len(plan.units) > 1
    convert_units(plan.model_copy(update={"units": plan.units[:1]}), str(dest))  # then the driver dies
    planner._MEASURED.clear()
    summary = run_conversion(str(tiny_llama), str(dest), recipe, shard_size=SHARD)
    assert summary.plan_id == plan.plan_id and summary.reused_units == 1
    assert file_digests(open_storage(dest)) == file_digests(open_storage(mixed[0]))


@pytest.mark.slow  # a Prefect server per CLI process (CI runs slow tests too)
@pytest.mark.parametrize(("option", "value", "message"), [
    ("--target-bits", "2", "quantfleet: error: budget of 2 bits per quantized weight is below the smallest "
                           "the candidates can store: 4.1"),
    ("--target-size", "12XB", "quantfleet: error: --target-size: not a size: '12XB'"),
])
def test_a_bad_budget_is_one_line_in_the_default_prefect_mode(tiny_llama, tmp_path, option, value,
                                                              message) -> None:
    import ray

    env = {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": "",
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    result = run_cli("convert", str(tiny_llama), str(tmp_path / "out"), option, value, env=env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith(message), result.stderr
    assert not (tmp_path / "out" / "_QUANTFLEET_PUBLISHED.json").exists()


def test_a_size_budget_below_what_the_kept_tensors_take_is_refused(tiny_llama, tmp_path, capsys) -> None:
    # The embedding and the head alone take 1 MiB: nothing is left for the quantized tensors.
    argv = ["convert", str(tiny_llama), str(tmp_path / "out"), "--target-size", "1MB", "--no-prefect"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("quantfleet: error: budget of 1 MB in all (1000000 bytes) is below "
                              "the smallest the candidates can store: "), err
    assert re.search(r"store: [0-9.]+ MB in all \([0-9]+ bytes, every tensor", err[-1]), err


def test_a_session_token_that_expires_while_measuring_fails_the_unit_in_a_way_that_stops_the_pass(
    tiny_llama, s3, monkeypatch  # noqa: ANN001
) -> None:
    # The measure pass reads every quantized tensor of a checkpoint on object storage, for an hour
    # on a 1T model: a session token can run out during it. Its unit says so in a way that stops the
    # pass (a FailsEveryUnit), as a converting unit does, not as one more unit that failed.
    from tests.flows.conftest import upload_dir
    from tests.infra.fault_proxy import FaultProxy
    from workers.errors import CredentialsRefused
    from workers.measure_unit import MeasureContext, measure_unit

    source = f"s3://{s3.create_bucket()}/llama"
    upload_dir(tiny_llama, open_storage(source))
    plan = plan_conversion(source, Recipe.preset("W4A16"), shard_size=SHARD)
    choices = Recipe.preset("W4A16", target_bits=5.0).candidate_choices()
    context = MeasureContext(source_uri=source, candidates=tuple(c.resolve() for c in choices),
                             methods=tuple(c.method for c in choices), device="cpu")
    unit = next(u for u in plan.units if any(j.scheme is not None for j in u.jobs))
    with FaultProxy(s3.host, s3.port) as proxy:
        monkeypatch.setenv("QUANTFLEET_S3_ENDPOINT_URL", proxy.endpoint_url)
        proxy.add("expired", method="GET", times=1000)
        with pytest.raises(CredentialsRefused) as failed:
            measure_unit(unit, context)
    assert str(failed.value).startswith(f"unit {unit.index} ({unit.file_name}): {source}/"), failed.value
    assert str(failed.value).endswith("ExpiredToken: The provided token has expired.")

