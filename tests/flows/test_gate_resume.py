"""A run stopped by a per-tensor gate resumes from its staged units once the gate is relaxed; a
unit staged under a looser gate is checked against a tighter one before it is reused.

The per-tensor gates decide whether a unit passes, not its bytes, so they are left out of the
staging id (`flows.plan.identify_plan`): before, relaxing a gate converted the whole model again
(hours on a large one). Real local Ray, both output formats, and the CLI in its default
(Prefect) mode.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.execute import ConversionFailed
from flows.pipeline import convert_units, finalize_and_publish, plan_conversion
from flows.recipe import Gates, Recipe
from infra.publish import is_published
from infra.storage import open_storage
from tests.flows.test_cli import run_cli
from tests.gguf.models import save_gguf_source
from workers.records import UnitResult

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]

SHARD = 300_000  # bytes: the tiny Llama in several units


def _worst(result: UnitResult) -> float:
    """The unit's lowest SQNR (infinite for a unit that keeps every tensor: no gate fails it)."""
    return min((t.sqnr_db for t in result.tensors if t.scheme is not None and t.sqnr_db is not None),
               default=float("inf"))


@pytest.mark.parametrize(("scheme", "output"), [("W4A16", "compressed-tensors"), ("Q4_K", "gguf")])
def test_a_tighter_gate_fails_a_staged_unit_and_a_looser_one_reuses_it(
    tmp_path: Path, scheme: str, output: str
) -> None:
    source = save_gguf_source("llama", tmp_path / "llama")  # with the tokenizer GGUF output needs

    def plan(gate: float):  # noqa: ANN202
        recipe = Recipe(scheme=scheme, format=output, gates=Gates(min_sqnr_db=gate))
        return plan_conversion(str(source), recipe, shard_size=SHARD)

    dest = str(tmp_path / "out")
    loose = plan(1.0)
    staged = convert_units(loose, dest, device="cpu")  # every unit staged, nothing published yet
    worst = sorted(_worst(r) for r in staged)
    assert len(worst) >= 3 and worst[0] < worst[1]
    gate = round((worst[0] + worst[1]) / 2, 3)  # only the worst unit is below it

    tight = plan(gate)
    assert tight.plan_id != loose.plan_id and tight.staging_id == loose.staging_id
    with pytest.raises(ConversionFailed) as failed:
        convert_units(tight, dest, device="cpu")
    assert len(failed.value.failures) == 1, str(failed.value)
    message = str(failed.value)
    assert f"below the gate (SQNR >= {gate:g} dB" in message and "(as staged by an earlier run)" in message

    again = convert_units(plan(2.0), dest, device="cpu")
    assert all(r.reused for r in again) and len(again) == len(staged)
    finalize_and_publish(plan(2.0), dest, again, device="cpu")
    assert is_published(open_storage(dest), "")


def test_relaxing_the_gate_that_stopped_a_cli_run_resumes_it(
    cli_env: dict[str, str], tiny_llama: Path, tmp_path: Path
) -> None:
    # The figures, to put a gate between the worst unit and the rest (converted elsewhere).
    probe = plan_conversion(str(tiny_llama), Recipe(scheme="W4A16"), shard_size=SHARD)
    worst = sorted(_worst(r) for r in convert_units(probe, str(tmp_path / "figures"), device="cpu"))
    gate = round((worst[0] + worst[1]) / 2, 3)
    strict, relaxed = tmp_path / "strict.yaml", tmp_path / "relaxed.yaml"
    strict.write_text(f"scheme: W4A16\ngates:\n  min_sqnr_db: {gate}\n")
    relaxed.write_text("scheme: W4A16\ngates:\n  min_sqnr_db: 1\n")
    dest = tmp_path / "out"
    args = ("convert", str(tiny_llama), str(dest), "--shard-size", str(SHARD))

    stopped = run_cli(*args, "--recipe", str(strict), env=cli_env)
    assert stopped.returncode == 2, stopped.stderr
    assert "1 unit(s) failed" in stopped.stderr and f"below the gate (SQNR >= {gate:g} dB" in stopped.stderr
    resumed = run_cli(*args, "--recipe", str(relaxed), env=cli_env)
    assert resumed.returncode == 0, resumed.stderr
    units = len(probe.units)
    assert f"{units} units, {units - 1} reused from an earlier run" in resumed.stdout, resumed.stdout
    assert not (dest / ".staging").exists()
