"""User errors in the default (Prefect) mode: the console shows the CLI's line, no traceback.

Each case runs the CLI as a user does, in its own process, against a real (temporary) Prefect
server and the test session's Ray; the flow run must still be recorded as failed, with the
message, on that server.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.flows.test_cli import _corrupt_copy, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]

TENSOR = "encoder.layer.0.attention.self.query.weight"


def _nan_copy(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    tensors = load_file(dest / "model.safetensors")
    tensors[TENSOR][3, 5] = float("nan")
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def _failed_flow_messages() -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    async def read() -> list[str]:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.FAILED]))
                )
            )
            return [run.state.message or "" for run in runs if run.state is not None]

    return asyncio.run(read())


def _cases(minilm: str, tmp: Path) -> dict[str, tuple[list[str], str]]:
    strict = tmp / "strict.yaml"
    strict.write_text("scheme: W4A16\ngates:\n  min_sqnr_db: 60\n")
    return {
        "nan weight": (["convert", str(_nan_copy(Path(minilm), tmp / "nan")), str(tmp / "out-nan"),
                        "--scheme", "W8A16"], "non-finite value"),
        "failed gate": (["convert", minilm, str(tmp / "out-gate"), "--recipe", str(strict)],
                        "below the gate (SQNR >= 60 dB"),
        "bad source file": (["convert", str(_corrupt_copy(Path(minilm), tmp / "bad")), str(tmp / "out-bad")],
                            TENSOR),
    }


def test_user_errors_print_one_line_and_no_traceback(cli_env, minilm, tmp_path) -> None:
    for case, (args, expected) in _cases(minilm, tmp_path).items():
        result = run_cli(*args, env=cli_env)
        err = result.stderr
        assert result.returncode == 2, f"{case}:\n{err}"
        assert "Traceback" not in err, f"{case}:\n{err}"
        # What is left once the progress bar's line is set aside: the error line(s) alone.
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("converting ")]
        assert lines and lines[0].startswith("quantfleet: error:"), f"{case}:\n{err}"
        assert expected in err, f"{case}:\n{err}"
        assert not any("prefect" in line and "ERROR" in line for line in lines), f"{case}:\n{err}"
        # The Prefect run is still marked failed, with the message.
        assert any(expected in message for message in _failed_flow_messages()), case
        assert not (Path(args[2]) / "_QUANTFLEET_PUBLISHED.json").exists()


def test_with_the_temporary_server_a_failed_run_prints_only_its_error(minilm, tmp_path) -> None:
    # No server configured: the CLI's own temporary server, stopped at exit. Prefect's log worker
    # sends the run's failure logs in the background; they must reach the server before it stops
    # (once, in 3 runs of 4, they did not, and Prefect printed "--- Error logging to API ---").
    env = {"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "prefect")}
    source = _nan_copy(Path(minilm), tmp_path / "nan")
    for attempt in range(2):
        result = run_cli("convert", str(source), str(tmp_path / f"out-{attempt}"), "--scheme", "W8A16",
                         env=env)
        lines = [line for line in result.stderr.splitlines()
                 if line.strip() and not line.startswith("converting ")]
        assert result.returncode == 2, result.stderr
        assert "non-finite value" in result.stderr, result.stderr
        assert lines[0].startswith("quantfleet: error:"), result.stderr
        assert all(line.startswith(("quantfleet: error:", "  - ")) for line in lines), result.stderr


def test_verbose_shows_prefects_traceback(cli_env, minilm, tmp_path) -> None:
    source = _nan_copy(Path(minilm), tmp_path / "nan")
    result = run_cli("-v", "convert", str(source), str(tmp_path / "out"), "--scheme", "W8A16", env=cli_env)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "non-finite value" in result.stderr
    assert torch.isnan(load_file(source / "model.safetensors")[TENSOR]).any()  # the input is untouched


def test_verbose_log_lines_print_above_the_progress_bar(cli_env, minilm, tmp_path) -> None:
    # The bar redraws itself after a carriage return; a log record written without clearing it
    # first ran on from the bar's text ("... [00:00<?, ?B/s]12:46:40 | INFO | Flow run ...").
    # Prefect's own INFO records, whatever an in-process CLI call of another test left in the
    # environment this process's children inherit (without -v the CLI sets WARNING).
    env = {**cli_env, "PREFECT_LOGGING_LEVEL": "INFO"}
    result = run_cli("-v", "convert", minilm, str(tmp_path / "out"), "--shard-size", "20MB", env=env,
                     raw_newlines=True)
    assert result.returncode == 0, result.stderr
    # Not a terminal (a scheduler's log, CI): each redraw is a line of its own, never a carriage
    # return, which a log collector shows as one line at the end of the run.
    assert "\r" not in result.stderr, result.stderr
    pieces = re.split(r"[\r\n]", result.stderr)
    bars = [piece for piece in pieces if "converting 3 units" in piece]
    assert bars and all(piece.startswith("converting 3 units") for piece in bars), result.stderr
    assert any("100%" in piece and "units 3/3" in piece for piece in bars), result.stderr
    # Prefect's first record, and one logged while the bar is drawn: each on a line of its own.
    for text in ("Beginning flow run", "unit(s) converted"):
        records = [piece for piece in pieces if text in piece]
        assert records, result.stderr
        assert not any("converting 3 units" in piece or "B/s" in piece for piece in records), result.stderr


def test_a_shard_edited_after_staging_is_redone_and_its_warning_prints_above_the_bar(
    cli_env, minilm, tmp_path
) -> None:
    # An interrupted run left every unit staged; then another tool wrote into one staged shard in
    # place (same size). Its recorded digest must not vouch for the new bytes: the re-run redoes
    # that unit, and the worker's warning (printed by Ray, from the worker) gets a line of its own.
    from flows.pipeline import convert_units, plan_conversion
    from flows.recipe import Recipe

    dest = tmp_path / "out"
    convert_units(plan_conversion(minilm, Recipe(scheme="W4A16"), shard_size=20_000_000), str(dest))
    (edited,) = dest.glob(".staging/*/model-00002-of-00003.safetensors")
    time.sleep(0.05)  # past the clock tick the staging write was stamped with
    with open(edited, "r+b") as handle:
        handle.seek(edited.stat().st_size // 2)
        handle.write(bytes(64))
    result = run_cli("convert", minilm, str(dest), "--shard-size", "20MB", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "3 units, 2 reused from an earlier run" in result.stdout
    pieces = re.split(r"[\r\n]", result.stderr)
    warnings = [piece for piece in pieces if "does not match its record; redoing it" in piece]
    assert warnings and not any("converting 3 units" in piece for piece in warnings), result.stderr
    verified = run_cli("verify", str(dest))  # every published file's bytes against the manifest
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_an_evaluation_that_cannot_run_is_refused_before_converting(cli_env, minilm, tmp_path) -> None:
    # Evaluating comes after converting: a missing tokenizer or text must stop the run at the
    # start (nothing converted, no destination folder), not after hours of converting.
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(minilm) / name, bare / name)
    cases = {
        "no tokenizer": (["convert", str(bare), str(tmp_path / "out-tok"), "--evaluate"],
                         f"{bare}: no tokenizer files"),
        "no text": (["convert", minilm, str(tmp_path / "out-text"), "--evaluate",
                     "--eval-text", str(tmp_path / "missing.txt")],
                    "missing.txt: cannot read the evaluation text"),
    }
    for case, (args, expected) in cases.items():
        result = run_cli(*args, env=cli_env)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, f"{case}:\n{result.stderr}"
        assert len(lines) == 1 and lines[0].startswith("quantfleet: error:"), f"{case}:\n{result.stderr}"
        assert expected in lines[0] and "--evaluate" in lines[0], f"{case}:\n{result.stderr}"
        assert not Path(args[2]).exists(), case  # not converted, not even an empty folder


def test_a_config_json_planning_cannot_use_is_one_line_before_converting(cli_env, minilm, tmp_path) -> None:
    # config.json is read at planning (the source's format, the output's quantization_config, the
    # GGUF header): a hand-edited one printed json's traceback, an AttributeError, or (for GGUF) a
    # bare "'vocab_size'" from the worker writing the first split, after converting.
    config = json.loads((Path(minilm) / "config.json").read_text())
    cases = {
        "not JSON": ('{"model_type": "bert",}', [], "config.json: not valid JSON (Expecting"),
        "not an object": ('["bert"]', [], "config.json: must hold a JSON object, not list"),
        "wrong type": (json.dumps({**config, "quantization_config": "fp8"}), [],
                       "config.json: 'quantization_config' must be an object, not 'fp8'"),
        "gguf key missing": (json.dumps({**config, "architectures": ["LlamaForCausalLM"]}),
                             ["--format", "gguf", "--scheme", "Q8_0"],
                             "config.json: lacks 'rms_norm_eps', which GGUF output needs"),
    }
    for case, (text, options, expected) in cases.items():
        source = tmp_path / case.replace(" ", "-")
        shutil.copytree(minilm, source)
        (source / "config.json").write_text(text)
        dest = tmp_path / f"out-{source.name}"
        result = run_cli("convert", str(source), str(dest), *options, env=cli_env)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, f"{case}:\n{result.stderr}"
        assert len(lines) == 1 and lines[0].startswith("quantfleet: error:"), f"{case}:\n{result.stderr}"
        assert f"{source}/{expected}" in lines[0], f"{case}:\n{result.stderr}"
        assert not dest.exists(), case


@pytest.mark.parametrize(("text", "message"), [
    # PyYAML's own message spans four lines.
    ("scheme: W4A16\n  gates: : :\n",
     "not valid YAML: mapping values are not allowed here (line 2, column 8)"),
    # An llm-compressor recipe whose method needs calibration data.
    ("quant_stage:\n  quant_modifiers:\n    GPTQModifier:\n      scheme: W4A16\n",
     "GPTQModifier: needs calibration data, which quantfleet does not take (it converts without running "
     "the model); use a QuantizationModifier (round to nearest), or quantfleet's own recipe with method: "
     "search or hqq (data-free, better than round to nearest)"),
], ids=["not-yaml", "gptq"])
def test_a_recipe_that_cannot_be_used_is_one_line_in_the_default_mode(cli_env, minilm, tmp_path, text,
                                                                       message) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    result = run_cli("convert", minilm, str(tmp_path / "out"), "--recipe", str(recipe), env=cli_env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert lines == [f"quantfleet: error: {recipe}: {message}"], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_ray_address_nothing_answers_at_is_one_line_at_once(cli_env, minilm, tmp_path) -> None:
    # ray.init() retried for minutes, printing Ray's warnings, before it gave up.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # free again once closed: nothing listens there
    for mode in ([], ["--no-prefect"]):
        result = run_cli("convert", minilm, str(tmp_path / "out"), "--ray-address", f"127.0.0.1:{closed}",
                         *mode, env=cli_env)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, result.stderr
        assert lines == [f"quantfleet: error: cannot reach the Ray cluster at 127.0.0.1:{closed} "
                         "(Connection refused): check --ray-address or RAY_ADDRESS, or leave both unset "
                         "to start a local Ray"], result.stderr
        assert not (tmp_path / "out").exists()


def test_device_cuda_on_a_cluster_without_a_gpu_is_one_line(cli_env, minilm, tmp_path) -> None:
    import ray

    if ray.cluster_resources().get("GPU", 0) > 0:
        pytest.skip("the test session's Ray has a GPU here: --device cuda is valid on it")
    # Every unit failed on its worker with "torch.cuda.Stream requires CUDA support".
    result = run_cli("convert", minilm, str(tmp_path / "out"), "--device", "cuda", env=cli_env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("quantfleet: error: --device cuda: the Ray cluster at "), \
        result.stderr
    assert "has no GPU" in lines[0] and "use --device auto" in lines[0], result.stderr
    assert not (tmp_path / "out" / "_QUANTFLEET_PUBLISHED.json").exists()
