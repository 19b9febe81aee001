"""The command line as a user meets it: help, one-line errors, the demo, and bad input."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import bundled_model_path, main

pytestmark = pytest.mark.usefixtures("local_ray")


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            raw_newlines: bool = False) -> subprocess.CompletedProcess[str]:
    """The CLI in its own process; `raw_newlines` keeps carriage returns (text mode turns them
    into newlines)."""
    result = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True,
                            env={**os.environ, **(env or {})}, timeout=600, cwd=cwd)
    decoded = [stream.decode(errors="replace") for stream in (result.stdout, result.stderr)]
    if not raw_newlines:
        decoded = [text.replace("\r\n", "\n").replace("\r", "\n") for text in decoded]
    return subprocess.CompletedProcess(result.args, result.returncode, *decoded)


def test_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = capsys.readouterr().out
    for option in ("--scheme", "--recipe", "--group-size", "--symmetric", "--asymmetric", "--per-channel",
                   "--ignore", "--shard-size", "--ray-address", "--device", "--no-prefect", "--format"):
        assert option in text


def test_schemes_lists_the_gguf_types_too(capsys) -> None:
    assert main(["schemes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines if line.strip()}
    assert rows["W4A16"].endswith("4.12") and rows["Q8_0"].endswith("8.50")
    assert rows["Q4_K_M"].endswith("4.50 / 6.56") and rows["BF16"].endswith("16.00")


def test_version_is_the_one_plans_and_manifests_record(capsys) -> None:
    from flows.plan import TOOL_VERSION

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"quantfleet {TOOL_VERSION}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "/no/such/checkpoint"],
         "quantfleet: error: file:///no/such/checkpoint: nothing there (no such folder, or an empty one)"),
        (["plan", "{minilm}", "--scheme", "W3A16"],
         "quantfleet: error: unknown scheme 'W3A16'; valid schemes:"),
        (["plan", "ftp://host/x"], "quantfleet: error: "),
        # Taken, then undone weight by weight: every tensor stored per channel.
        (["plan", "{minilm}", "--group-size", "7"],
         "quantfleet: error: scheme W4A16: group size 7: int weights are stored in groups of 128, 64, 32 "
         "(what vLLM's int kernels load), or per output channel"),
        (["convert", "{minilm}", "/tmp/qf-test-never-written", "--group-size", "48"],  # default Prefect mode
         "quantfleet: error: scheme W4A16: group size 48: int weights are stored in groups of 128, 64, 32"),
        (["plan", "{minilm}", "--scheme", "NVFP4A16", "--group-size", "32"],
         "quantfleet: error: scheme NVFP4A16: the format fixes the group size at 16"),
        (["compile-kernels", "--schemes", "FP8,W3A16"], "quantfleet: error: unknown scheme 'W3A16'"),
    ],
)
def test_user_mistakes_get_one_line(minilm, capsys, args, message) -> None:
    code = main([a.format(minilm=minilm) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(message), err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_a_size_too_large_for_a_float_is_an_option_error(minilm, capsys) -> None:
    # --shard-size 1e400 was an OverflowError's traceback.
    with pytest.raises(SystemExit) as done:
        main(["plan", minilm, "--shard-size", "1e400"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("quantfleet plan: error: argument --shard-size: size must be a "
                                            "positive, finite number of bytes: '1e400'"), err


def test_a_source_without_config_json_is_planned_with_a_warning(minilm, tmp_path, caplog) -> None:
    # Allowed (the weights alone convert), but the result cannot be loaded by vLLM or transformers
    # without a config to carry its quantization_config: the user is told before converting.
    source = tmp_path / "no-config"
    shutil.copytree(minilm, source)
    (source / "config.json").unlink()
    with caplog.at_level(logging.WARNING, logger="flows.pipeline"):
        assert main(["plan", str(source)]) == 0
    assert any(f"{source} has no config.json" in r.getMessage() and "quantization_config" in r.getMessage()
               for r in caplog.records), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flows.pipeline"):
        assert main(["plan", minilm]) == 0
    assert not caplog.records


def test_a_safetensors_file_the_index_does_not_name_is_left_out_with_a_warning(tiny_llama, tmp_path,
                                                                                caplog) -> None:
    source = tmp_path / "stray"
    shutil.copytree(tiny_llama, source)
    shutil.copy(next(source.glob("model-00001-*.safetensors")), source / "consolidated.safetensors")
    with caplog.at_level(logging.WARNING, logger="flows.pipeline"):
        assert main(["plan", str(source)]) == 0
    line = f"{source}: consolidated.safetensors not named in model.safetensors.index.json"
    assert any(line in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("mode", [[], ["--no-prefect"]], ids=["prefect", "no-prefect"])
def test_a_checkpoint_whose_numbered_shards_are_not_all_there_is_refused_as_incomplete(
    tiny_llama, tmp_path, capsys, mode  # noqa: ANN001
) -> None:
    # A copy cut short, or an upload still going (the index often lands last): shards 1 and 2 of
    # 3 were converted and published as the whole model, without the layers of shard 3.
    source = tmp_path / "partial"
    shutil.copytree(tiny_llama, source)
    (source / "model.safetensors.index.json").unlink()
    (source / "model-00003-of-00003.safetensors").unlink()
    dest = tmp_path / "out"
    assert main(["convert", str(source), str(dest), "--scheme", "W8A16", *mode]) == 2
    assert capsys.readouterr().err == (
        f"quantfleet: error: file://{source}: 1 of 3 shards are missing (model-00003-of-00003.safetensors), "
        "and there is no model.safetensors.index.json: the checkpoint is incomplete (still uploading, or "
        "copied in part)\n")
    assert not dest.exists()


@pytest.mark.parametrize("argv", [
    ["plan", "{source}"],
    ["convert", "{source}", "{dest}"],
    ["convert", "{source}", "{dest}", "--no-prefect"],
    ["sync", "{source}", "{dest}", "--recipe", "W4A16", "--no-prefect"],
    ["verify", "{source}"],
], ids=["plan", "convert", "convert-no-prefect", "sync", "verify"])
def test_a_mistyped_source_path_is_one_line_and_creates_nothing(tmp_path, capsys, argv) -> None:
    # Opening a local folder made it: every command that read a mistyped path left an empty
    # folder there (and said "no *.safetensors files" of a folder that never existed).
    source, dest = tmp_path / "typo" / "model", tmp_path / "out"
    code = main([a.format(source=source, dest=dest) for a in argv])
    err = capsys.readouterr().err
    if argv[0] == "sync":  # finds no checkpoint under it: nothing to do
        assert code == 0, err
    else:
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    if argv[0] in ("plan", "convert"):
        assert err == f"quantfleet: error: file://{source}: nothing there (no such folder, or an empty one)\n"
    assert not (tmp_path / "typo").exists() and not dest.exists()


@pytest.mark.parametrize("command", [["plan"], ["convert", "--no-prefect"], ["convert"], ["verify"]])
def test_a_file_given_for_a_folder_is_one_line(tiny_llama, tmp_path, capsys, command) -> None:
    # `quantfleet convert model.safetensors out` was a FileExistsError traceback.
    shard = tiny_llama / "model-00001-of-00003.safetensors"
    dest = [str(tmp_path / "out")] if command[0] == "convert" else []
    argv = [command[0], str(shard), *dest, *command[1:]]
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"quantfleet: error: file://{shard}: a file, not a folder; name the "
                                       f"folder that holds it ({tiny_llama})\n")
    assert not (tmp_path / "out").exists()


def test_missing_credentials_is_one_clear_line(s3) -> None:
    bucket = s3.create_bucket()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true")
    result = subprocess.run([sys.executable, "-m", "flows.cli", "plan", f"s3://{bucket}/model"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "no usable AWS credentials" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_plan_prints_a_table_and_json(minilm, capsys) -> None:
    assert main(["plan", minilm, "--scheme", "W4A16", "--shard-size", "30MB"]) == 0
    table = capsys.readouterr().out
    assert "model-00001-of-00003.safetensors" in table and "total" in table
    assert main(["plan", minilm, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["units"]) == 1 and plan["schemes"][0]["name"] == "W4A16"


def processes_started_with(marker: str) -> list[int]:
    """The live processes whose environment holds `marker` (every process a command started
    inherits its environment: Ray's, Prefect's server, workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def test_demo_converts_the_bundled_model_with_prefect_local_mode(tmp_path) -> None:
    marker = f"QUANTFLEET_TEST_RUN={tmp_path.name}"
    env = {"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "prefect"),
           "QUANTFLEET_TEST_RUN": tmp_path.name}
    first = run_cli("demo", str(tmp_path / "demo"), env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    # The command stops Ray and Prefect's temporary server itself before it exits (flows.cli.entry):
    # nothing it started outlives it.
    assert processes_started_with(marker) == []
    assert "Published: file://" in first.stdout and "compression ratio" in first.stdout
    assert "s of fixed start-up (Prefect's server, Ray, planning)" in first.stdout, first.stdout
    # An empty PREFECT_API_URL means a temporary server; Prefect's events worker would take it
    # for a server's address and print a traceback for every event.
    assert "Traceback" not in first.stderr and "Error emitting event" not in first.stderr, first.stderr
    again = run_cli("demo", str(tmp_path / "demo"), env=env)
    assert again.returncode == 0 and "already holds the demo conversion" in again.stdout
    # Another scheme's demo is another conversion: refused, not passed off as the one there.
    other = run_cli("demo", str(tmp_path / "demo"), "--scheme", "FP8", env=env)
    assert other.returncode == 2 and other.stderr.strip().endswith(
        ": W4A16 of file://" + bundled_model_path() + "); choose another destination (published versions "
        "are never overwritten)"), other.stdout + other.stderr
    # Without a folder, each scheme's demo goes to its own (all of them went to ...-W4A16).
    fp8 = run_cli("demo", "--scheme", "FP8", env=env, cwd=tmp_path)
    assert fp8.returncode == 0, fp8.stdout + fp8.stderr
    assert f"Published: file://{tmp_path}/out/all-minilm-l6-v2-FP8" in fp8.stdout, fp8.stdout
    # A published result is a compressed-tensors source: planned for dequantization, not refused.
    planned = run_cli("plan", str(tmp_path / "demo"), "--scheme", "W8A16")
    assert planned.returncode == 0 and "source: compressed-tensors" in planned.stdout, planned.stderr


def test_verbose_shows_the_run_without_every_http_request(minilm, tmp_path) -> None:
    import ray

    # PREFECT_LOGGING_LEVEL: whatever an in-process CLI call of another test left in this process's
    # environment (without -v the CLI sets WARNING), the child logs Prefect's INFO records.
    env = {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": "", "PREFECT_LOGGING_LEVEL": "INFO",
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    result = run_cli("-v", "convert", minilm, str(tmp_path / "out"), "--scheme", "W8A16", env=env)
    assert result.returncode == 0, result.stderr
    assert "start-up: planned at" in result.stderr and "prefect.flow_runs" in result.stderr, result.stderr
    assert "HTTP Request:" not in result.stderr, result.stderr  # was a third of the lines
    # The temporary server serves no UI and stops with the command: no link to it.
    assert "View at" not in result.stderr, result.stderr


def test_a_published_destination_takes_only_the_command_that_published_it(minilm, tmp_path, capsys) -> None:
    source = tmp_path / "source"
    shutil.copytree(minilm, source)
    dest = tmp_path / "out"
    argv = ["convert", str(source), str(dest), "--scheme", "FP8", "--no-prefect"]
    assert main(argv) == 0
    # Without Prefect no server was started: the time line does not say one was.
    assert re.search(r"Time: .* s of fixed start-up \(Ray, planning\)\n", capsys.readouterr().out)
    plan_id = json.loads((dest / "quantfleet.json").read_text())["plan_id"]
    published = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    capsys.readouterr()

    # The same command again (a scheduler's retry): a success with nothing to do, nothing touched.
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"file://{dest} already holds this conversion (plan {plan_id}); nothing to do." in out, out
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == published

    # Another recipe: refused before planning, naming what is there.
    assert main(["convert", str(source), str(dest), "--scheme", "W8A16", "--no-prefect"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"quantfleet: error: file://{dest}: already holds a published conversion (plan "
                           f"{plan_id}: FP8 of file://{source}); choose another destination (published "
                           "versions are never overwritten)"), err

    # The same request on a source rewritten since: refused after planning, naming both plans.
    weights = source / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"quantfleet: error: file://{dest}: already holds this recipe's conversion of "
                          "an earlier state of the source, or with another shard size (published plan "
                          f"{plan_id}; this command plans "), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == published


def _corrupt_copy(source: Path, dest: Path) -> Path:
    """A copy of the checkpoint whose header claims a tensor shape its bytes do not hold."""
    dest.mkdir()
    for path in source.iterdir():
        if path.is_file():
            (dest / path.name).write_bytes(path.read_bytes())
    model = dest / "model.safetensors"
    raw = model.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    name = "encoder.layer.0.attention.self.query.weight"
    header[name]["shape"] = [384, 385]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    model.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
    return dest


def test_a_bad_source_file_names_file_and_tensor_and_publishes_nothing(minilm, tmp_path, capsys):
    source = _corrupt_copy(Path(minilm), tmp_path / "bad")
    dest = tmp_path / "out"
    assert main(["convert", str(source), str(dest), "--no-prefect"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "encoder.layer.0.attention.self.query.weight" in err
    assert not dest.exists()  # not even an empty folder: nothing was written


def test_a_failed_gate_names_the_tensor_and_publishes_nothing(minilm, tmp_path, capsys):
    recipe = tmp_path / "strict.yaml"
    recipe.write_text("scheme: W4A16\ngates:\n  min_sqnr_db: 60\n")
    dest = tmp_path / "out"
    assert main(["convert", minilm, str(dest), "--recipe", str(recipe), "--no-prefect"]) == 2
    err = capsys.readouterr().err
    assert "unit(s) failed" in err and "below the gate (SQNR >= 60 dB" in err
    assert not (dest / "_QUANTFLEET_PUBLISHED.json").exists()
    assert not (dest / "model.safetensors").exists()


def test_a_bad_recipe_names_the_file_and_field(minilm, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("scheme: W4A16\ngates:\n  min_sqnr: 10\n")
    assert main(["plan", minilm, "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"quantfleet: error: {recipe}: gates.min_sqnr: Extra inputs are not permitted")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # PyYAML's own message spans four lines (the text, a caret under it).
        (b"scheme: W4A16\n  gates: : :\n",
         "not valid YAML: mapping values are not allowed here (line 2, column 8)"),
        (b"\xff\xfescheme", "cannot read recipe: 'utf-8' codec can't decode byte 0xff"),
        # A gate no tensor can pass failed every unit after converting it.
        (b"scheme: W4A16\ngates:\n  min_sqnr_db: .nan\n",
         "gates.min_sqnr_db: Input should be a finite number"),
        (b"scheme: W4A16\ngates:\n  min_cosine: 2\n",
         "gates.min_cosine: Input should be less than or equal to 1"),
        # A checkpoint vLLM's int kernels cannot load (they take groups of 32, 64 and 128).
        (b"scheme: W4A16\ngroup_size: 256\n", "scheme W4A16: group size 256: int weights are stored in "
                                             "groups of 128, 64, 32"),
    ],
)
def test_a_recipe_file_that_cannot_be_used_is_one_line(minilm, tmp_path, capsys, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(text)
    assert main(["plan", minilm, "--recipe", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"quantfleet: error: {recipe}: {message}"), err
    assert err.count("\n") == 1, err


def test_recipe_targets_that_match_no_weight_are_warned_about(minilm, tmp_path, caplog) -> None:
    # A misspelt module name quantized as if the override were absent, and said nothing.
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("scheme: W4A16\noverrides:\n  - targets: ['encoder.layer.0.atention.self.query']\n"
                      "    scheme: W8A16\n  - targets: ['re:.*attention.self.query$']\n    scheme: W8A16\n")
    with caplog.at_level(logging.WARNING, logger="flows.pipeline"):
        assert main(["plan", minilm, "--recipe", str(recipe)]) == 0
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1, warned
    assert ("the recipe's overrides[0] targets ['encoder.layer.0.atention.self.query'] match no 2-D "
            "weight") in warned[0]
    caplog.clear()
    recipe.write_text("scheme: W4A16\ntargets: ['re:.*querry$']\n")
    with caplog.at_level(logging.WARNING, logger="flows.pipeline"):
        assert main(["plan", minilm, "--recipe", str(recipe)]) == 0
    assert ["the recipe's targets ['re:.*querry$'] match no 2-D weight" in r.getMessage()
            for r in caplog.records] == [True]


def test_compile_kernels_fills_the_kernel_cache_that_workers_use(tmp_path) -> None:
    # A fresh process and an empty cache: the compile really happens and lands in the directory
    # named by XDG_CACHE_HOME (what ~/.cache is to a user), which later processes then reuse.
    env = {"XDG_CACHE_HOME": str(tmp_path), "QUANTFLEET_COMPILE": "auto"}
    env_without = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    result = subprocess.run([sys.executable, "-m", "flows.cli", "compile-kernels", "--schemes", "FP8"],
                            capture_output=True, text=True, env={**env_without, **env}, timeout=600)
    assert result.returncode == 0, result.stderr
    cache = tmp_path / "quantfleet" / "inductor"
    assert f"into {cache}" in result.stdout and "FP8" in result.stdout
    assert any(path.is_file() for path in cache.rglob("*")), "nothing was compiled into the cache"


def test_local_conversion_without_prefect_or_boto3(minilm, tmp_path) -> None:
    """A GPU node's image has neither Prefect nor boto3 (scripts/gpu_node/): `convert --no-prefect`
    between local paths must not import them, in the driver or in its Ray workers (which inherit
    PYTHONPATH, so the stand-ins that refuse to import shadow the real packages there too)."""
    blocked = tmp_path / "blocked"
    for package in ("prefect", "boto3", "botocore"):
        (blocked / package).mkdir(parents=True)
        (blocked / package / "__init__.py").write_text(f"raise ImportError('{package} is not installed')\n")
    env = {"PYTHONPATH": f"{blocked}{os.pathsep}{Path(__file__).resolve().parents[2]}"}
    result = run_cli("convert", minilm, str(tmp_path / "out"), "--scheme", "W4A16", "--no-prefect", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "out" / "_QUANTFLEET_PUBLISHED.json").exists()
    # the stand-ins really shadow the packages: the S3 backend cannot load in that environment
    probe = subprocess.run([sys.executable, "-c", "from infra.storage import S3Storage"], text=True,
                           capture_output=True, env={**os.environ, **env})
    assert "boto3 is not installed" in probe.stderr


def test_the_size_line_says_larger_when_the_result_is_larger() -> None:
    from flows.cli import _size_change

    # FP8 of an int4 source grows: "0.74x smaller" said it backwards.
    assert _size_change(1_600, 2_160) == "1.35x larger"
    assert _size_change(4_400, 1_500) == "2.93x smaller"
    assert _size_change(0, 0) == _size_change(7, 7) == "the same size"
