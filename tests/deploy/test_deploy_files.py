"""Static checks of the deployment files: docker-compose.yml, infra/deploy/*, .dockerignore.

No Docker engine is needed (none exists on the development machines or CI). The files are parsed
and their wiring checked: one project image, versions equal to the tested venv, service names and
ports that exist, healthchecks behind every `service_healthy`, GPU reservation, no literal secrets,
every `${VAR}` defaulted and documented. When a Compose v2 CLI is installed, `docker compose config
-q` validates the file against the real Compose schema as well.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "infra" / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
KUBERAY = DEPLOY / "kuberay-raycluster.yaml"
K8S_SECRET = DEPLOY / "kuberay-s3-secret.example.yaml"
README = DEPLOY / "README.md"
ENV_EXAMPLE = DEPLOY / "env.example"
DOCKERIGNORE = ROOT / ".dockerignore"

PROJECT_IMAGE = "quantfleet:${QUANTFLEET_VERSION:-latest}"
PROJECT_SERVICES = {"prefect-server", "prefect-worker", "ray-head", "ray-gpu-worker"}
RAY_NODE_SERVICES = {"ray-head", "ray-gpu-worker", "prefect-worker"}
# Defaults that may appear for credentials: well-known local-development values, flagged in the file.
LOCAL_DEV_SECRET_DEFAULTS = {"minioadmin", "prefect"}
SECRET_KEY = re.compile(r"SECRET|PASSWORD|ACCESS_KEY|TOKEN", re.IGNORECASE)


# ----------------------------------------------------------------------------- helpers


def _load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _strings(node: Any) -> Iterator[str]:
    """Every string value in a parsed YAML tree (comments are already gone)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _interpolations(text: str) -> Iterator[tuple[str, str | None, str | None]]:
    """Compose `${NAME[op word]}` expressions in `text` as (name, op, word); `$${...}` is a literal.

    Handles nesting inside the word (`${A:-${B:-x}}`) by yielding the inner ones too.
    """
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            i += 2
            continue
        if not text.startswith("${", i):
            i += 1
            continue
        depth, j = 1, i + 2
        while j < len(text) and depth:
            if text.startswith("${", j):
                depth, j = depth + 1, j + 2
                continue
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        assert depth == 0, f"unterminated interpolation in {text!r}"
        body = text[i + 2 : j - 1]
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", body, re.DOTALL)
        assert m, f"malformed interpolation ${{{body}}} in {text!r}"
        yield m.group(1), m.group(2), m.group(3)
        if m.group(3):
            yield from _interpolations(m.group(3))
        i = j


def _resolve(text: str, env: dict[str, str] | None = None) -> str:
    """Interpolate like Compose: `${V:-d}`, `${V-d}`, `${V}`, `$$`; unset and no default -> ""."""
    env = env or {}
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                if text.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            name, op, word = re.fullmatch(
                r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", text[i + 2 : j - 1], re.DOTALL
            ).groups()  # type: ignore[union-attr]
            value = env.get(name)
            if op in (":-", "-") and (value is None or (op == ":-" and value == "")):
                value = _resolve(word or "", env)
            out.append(value or "")
            i = j
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...] form
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _command_text(service: dict[str, Any]) -> str:
    cmd = service.get("command") or ""
    return cmd if isinstance(cmd, str) else " ".join(str(part) for part in cmd)


def _container_ports(service: dict[str, Any]) -> set[int]:
    """Container-side ports a service publishes (`ports`) or declares (`expose`)."""
    found: set[int] = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            found.add(int(entry["target"]))
            continue
        spec = _resolve(str(entry)).split("/")[0]
        found.add(int(spec.rsplit(":", 1)[-1]))
    for entry in service.get("expose") or []:
        found.add(int(str(entry).split("/")[0]))
    return found


def _published(service: dict[str, Any]) -> dict[int, tuple[str, str]]:
    """container port -> (host ip, host port), with defaults resolved."""
    result: dict[int, tuple[str, str]] = {}
    for entry in service.get("ports") or []:
        parts = _resolve(str(entry)).split("/")[0].split(":")
        if len(parts) == 3:
            result[int(parts[2])] = (parts[0], parts[1])
        elif len(parts) == 2:
            result[int(parts[1])] = ("", parts[0])
    return result


def _host_port(value: str) -> tuple[str, int]:
    """'http://minio:9000/x' or 'ray-head:6379' -> (host, port)."""
    parts = urlsplit(value if "://" in value else f"//{value}")
    assert parts.hostname and parts.port, f"{value!r} has no host:port"
    return parts.hostname, parts.port


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    # Docker drops comment lines everywhere, including inside a continued instruction.
    lines = [raw for raw in DOCKERFILE.read_text().splitlines() if not raw.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line:
            keyword, _, args = line.partition(" ")
            out.append((keyword.upper(), args.strip()))
    return out


def _dockerfile_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for keyword, rest in _dockerfile_instructions():
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            previous = args.setdefault(name, value)
            assert previous == value, f"ARG {name} has different defaults in different stages"
    return args


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _public_version(version: str) -> str:
    return version.split("+", 1)[0]


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _kuberay_docs() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(KUBERAY.read_text()) if doc]


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    clusters = [doc for doc in _kuberay_docs() if doc.get("kind") == "RayCluster"]
    assert len(clusters) == 1, "kuberay-raycluster.yaml must hold exactly one RayCluster"
    return clusters[0]


def _ray_groups(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = cluster["spec"]
    groups = [("head", spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in spec.get("workerGroupSpecs") or []]
    return groups


# ----------------------------------------------------------------------------- helper self-checks


def test_interpolation_helpers_follow_compose_rules() -> None:
    assert _resolve("${A:-x}") == "x"
    assert _resolve("${A:-x}", {"A": ""}) == "x"
    assert _resolve("${A-x}", {"A": ""}) == ""
    assert _resolve("${A:-${B:-y}}") == "y"
    assert _resolve("$${A} ${A:-x}", {"A": "v"}) == "${A} v"
    assert list(_interpolations("$${A} ${B:-${C}} x")) == [("B", ":-", "${C}"), ("C", None, None)]


# ----------------------------------------------------------------------------- compose: images


def test_compose_declares_the_whole_stack(services: dict[str, dict[str, Any]]) -> None:
    expected = {"minio", "minio-init", "postgres"} | PROJECT_SERVICES
    assert expected <= set(services), f"missing services: {expected - set(services)}"


def test_project_services_share_one_image_and_only_one_builds(services: dict[str, dict[str, Any]]) -> None:
    project = {name for name, svc in services.items() if str(svc.get("image", "")).startswith("quantfleet:")}
    assert project >= PROJECT_SERVICES
    images = {services[name]["image"] for name in project}
    assert images == {PROJECT_IMAGE}, f"project services must share one tag, got {images}"

    builders = [name for name, svc in services.items() if "build" in svc]
    assert len(builders) == 1, f"exactly one service may build the image, got {builders}"
    builder = services[builders[0]]
    assert builders[0] in project, "the building service must be tagged with the project image"
    assert "profiles" not in builder, "the building service must be active in every profile"
    build = builder["build"]
    assert build["context"] == "."
    assert build["dockerfile"] == "infra/deploy/Dockerfile"
    assert (ROOT / build["context"] / build["dockerfile"]).is_file()

    # Anything that runs ray or prefect must run them from the project image (identical versions).
    for name, svc in services.items():
        if re.search(r"\b(ray|prefect)\b", _command_text(svc)):
            assert name in project, f"{name} runs ray/prefect but not from the project image"


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_python_matches_the_tested_interpreter() -> None:
    froms = [rest for keyword, rest in _dockerfile_instructions() if keyword == "FROM"]
    versions = set()
    for rest in froms:
        m = re.match(r"python:(\d+)\.(\d+)", rest)
        assert m, f"every stage must start from python:X.Y, got FROM {rest}"
        versions.add((int(m.group(1)), int(m.group(2))))
    assert len(versions) == 1, f"stages disagree on Python: {versions} (the venv is copied across)"
    (image_python,) = versions

    floor = re.search(r">=\s*(\d+)\.(\d+)", _pyproject()["project"]["requires-python"])
    assert floor
    allowed = {sys.version_info[:2], (int(floor.group(1)), int(floor.group(2)))}
    assert image_python in allowed, f"image Python {image_python} is neither the venv's nor the floor"


def test_dockerfile_pins_equal_the_installed_stack() -> None:
    ray = pytest.importorskip("ray", reason="ray is not installed in this venv; cannot compare pins")
    prefect = pytest.importorskip("prefect", reason="prefect is not installed in this venv")
    args = _dockerfile_args()
    assert args["RAY_VERSION"] == ray.__version__
    assert args["PREFECT_VERSION"] == prefect.__version__

    from packaging.requirements import Requirement

    torch_req = next(
        Requirement(d) for d in _pyproject()["project"]["dependencies"] if Requirement(d).name == "torch"
    )
    # The image's torch lies in the project's supported range (GPU images may carry another one).
    assert torch_req.specifier.contains(args["TORCH_VERSION"]), (args["TORCH_VERSION"], str(torch_req))
    assert args["TORCH_VERSION"] == _public_version(importlib.metadata.version("torch"))

    runs = " ".join(rest for keyword, rest in _dockerfile_instructions() if keyword == "RUN")
    assert '"ray[default]==${RAY_VERSION}"' in runs, "ray must be installed with [default] (dashboard)"
    assert '"prefect==${PREFECT_VERSION}"' in runs
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in runs
    assert "pip install /src" in runs, "the project itself must be installed (pip install .)"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    cuda = "--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128"
    assert cuda in DOCKERFILE.read_text() and cuda in README.read_text()


def test_dockerfile_runtime_is_non_root_with_cli_default() -> None:
    final = _final_stage()
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    assert users[-1].split(":")[0] not in {"root", "0"}
    # Numeric UID: Kubernetes runAsNonRoot can only verify a numeric USER.
    assert users[-1].split(":")[0].isdigit()
    assert any(keyword == "WORKDIR" for keyword, _ in final)
    entrypoint = [rest for keyword, rest in final if keyword == "ENTRYPOINT"]
    cmd = [rest for keyword, rest in final if keyword == "CMD"]
    assert entrypoint and "tini" in entrypoint[-1]
    assert cmd and yaml.safe_load(cmd[-1]) == ["quantfleet", "--help"]
    apt = " ".join(rest for keyword, rest in final if keyword == "RUN" and "apt-get" in rest)
    # wget: KubeRay's default readiness/liveness probes exec it; tini: the ENTRYPOINT.
    assert re.search(r"\bwget\b", apt) and re.search(r"\btini\b", apt)


def test_dockerignore_excludes_local_state_but_not_the_package() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    for required in (
        ".venv",
        ".git",
        "out",
        "**/__pycache__",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        ".env",
        "*.egg-info",
    ):
        assert required in patterns, f".dockerignore must exclude {required}"
    # `pip install .` needs these; a `*` or a direct hit would break the build.
    for needed in ("pyproject.toml", "README.md", "quantizers", "infra", "workers", "flows"):
        hits = [p for p in patterns if fnmatch.fnmatchcase(needed, p.removeprefix("**/"))]
        assert not hits, f".dockerignore would drop {needed} via {hits}"


# ----------------------------------------------------------------------------- compose: ports, env


def test_expected_ports_are_published_on_loopback_by_default(services: dict[str, dict[str, Any]]) -> None:
    expected = {"minio": {9000}, "prefect-server": {4200}, "ray-head": {6379, 8265}}
    for name, ports in expected.items():
        published = _published(services[name])
        assert ports <= set(published), f"{name} must publish {ports}, has {set(published)}"
        for port in ports:
            host_ip, host_port = published[port]
            assert host_port == str(port)
            # Ray's GCS/dashboard and MinIO's root login have no other protection.
            assert host_ip == "127.0.0.1", f"{name}:{port} must bind to loopback by default"


def test_service_addresses_point_at_existing_services_and_ports(services: dict[str, dict[str, Any]]) -> None:
    ports = {name: _container_ports(svc) for name, svc in services.items()}
    checked = 0
    for name, svc in services.items():
        env = {k: _resolve(v) for k, v in _env(svc).items()}
        addresses = [(k, v) for k, v in env.items() if k.endswith("_URL") or k == "RAY_ADDRESS"]
        addresses += [("--address", a) for a in re.findall(r"--address[= ](\S+)", _command_text(svc))]
        for key, value in addresses:
            if key == "PREFECT_UI_API_URL":  # browser-facing: localhost on purpose
                continue
            host, port = _host_port(value)
            assert host in services, f"{name}: {key}={value} names no service"
            assert port in ports[host], f"{name}: {key}={value}: {host} has no port {port}"
            checked += 1
    assert checked >= 10


def test_env_wiring_matches_the_issue(services: dict[str, dict[str, Any]]) -> None:
    worker = _env(services["prefect-worker"])
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    for name in ("prefect-worker", "ray-gpu-worker"):
        assert _env(services[name])["RAY_ADDRESS"] == "ray-head:6379"
    for name in RAY_NODE_SERVICES:
        env = _env(services[name])
        assert env["QUANTFLEET_S3_ENDPOINT_URL"] == "http://minio:9000", name
        assert env["AWS_ENDPOINT_URL"] == "http://minio:9000", name
        assert env["AWS_REGION"] == "us-east-1", name
        assert env["AWS_ACCESS_KEY_ID"] == "${MINIO_ROOT_USER:-minioadmin}", name
        assert env["AWS_SECRET_ACCESS_KEY"] == "${MINIO_ROOT_PASSWORD:-minioadmin}", name

    server = _env(services["prefect-server"])
    db = urlsplit(_resolve(server["PREFECT_API_DATABASE_CONNECTION_URL"]))
    assert db.scheme == "postgresql+asyncpg"
    assert (db.hostname, db.port) == ("postgres", 5432)
    assert server["PREFECT_SERVER_API_HOST"] == "0.0.0.0"
    assert "4200" in _command_text(services["prefect-server"])

    # The worker only uses the bucket minio-init creates, under the same variable.
    init = _env(services["minio-init"])
    assert init["QUANTFLEET_BUCKET"] == worker["QUANTFLEET_BUCKET"]


def test_ray_node_commands(services: dict[str, dict[str, Any]]) -> None:
    head = shlex.split(_command_text(services["ray-head"]))
    for flag in ("--head", "--port=6379", "--dashboard-host=0.0.0.0", "--num-gpus=0", "--block"):
        assert flag in head, f"ray-head command lacks {flag}"

    worker = _command_text(services["prefect-worker"])
    assert re.search(r"ray start --address=ray-head:6379 --num-cpus=0 --num-gpus=0", worker)
    assert re.search(r"prefect worker start --pool quantfleet\b", worker)
    # Ray node and worker live and die together: a worker without its Ray node cannot drive Ray.
    assert "--block &" in worker and "wait -n" in worker and "exit 1" in worker

    gpu = shlex.split(_command_text(services["ray-gpu-worker"]))
    assert gpu[:2] == ["ray", "start"] and "--block" in gpu and "--address=ray-head:6379" in gpu
    assert not any(arg.startswith("--num-gpus") for arg in gpu), "let Ray detect the GPUs"

    for name in RAY_NODE_SERVICES:
        shm = _resolve(str(services[name].get("shm_size", "")))
        m = re.fullmatch(r"(\d+)([kmg])b?", shm.lower())
        assert m, f"{name} needs shm_size for Ray's object store, got {shm!r}"
        size = int(m.group(1)) * {"k": 2**10, "m": 2**20, "g": 2**30}[m.group(2)]
        assert size >= 2**30, f"{name}: shm_size {shm} is too small for an object store"


def test_gpu_worker_reserves_nvidia_devices(services: dict[str, dict[str, Any]]) -> None:
    devices = services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    nvidia = [d for d in devices if d.get("driver") == "nvidia"]
    assert nvidia, "ray-gpu-worker must reserve an nvidia device"
    for device in nvidia:
        assert "gpu" in device["capabilities"]
        count = device.get("count")
        assert count == "all" or (isinstance(count, int) and count >= 1) or "device_ids" in device
    # Opt-in profile: an nvidia reservation on a host without the toolkit fails the whole `up`.
    assert "gpu" in services["ray-gpu-worker"].get("profiles", [])


# ----------------------------------------------------------------------------- compose: ordering


def test_depends_on_conditions_are_satisfiable(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {dep: {"condition": "service_started"} for dep in deps}
        for target, spec in deps.items():
            assert target in services, f"{name} depends on unknown service {target}"
            dependency = services[target]
            condition = spec.get("condition", "service_started")
            if condition == "service_healthy":
                check = dependency.get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), (
                    f"{name} waits for {target} to be healthy but {target} has no healthcheck"
                )
            elif condition == "service_completed_successfully":
                assert str(dependency.get("restart", "no")) == "no", f"{target} must be one-shot"
            # A dependency hidden behind a profile the dependent does not share would never start.
            missing = set(dependency.get("profiles", [])) - set(svc.get("profiles", []))
            assert not missing, f"{name} depends on {target}, which only runs with profiles {missing}"


def test_startup_order_and_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    def condition(name: str, target: str) -> str:
        return services[name]["depends_on"][target]["condition"]

    assert condition("minio-init", "minio") == "service_healthy"
    assert condition("prefect-server", "postgres") == "service_healthy"
    assert condition("prefect-worker", "prefect-server") == "service_healthy"
    assert condition("prefect-worker", "ray-head") == "service_healthy"
    assert condition("prefect-worker", "minio-init") == "service_completed_successfully"
    assert condition("ray-gpu-worker", "ray-head") == "service_healthy"

    def probe(name: str) -> str:
        test = services[name]["healthcheck"]["test"]
        return test if isinstance(test, str) else " ".join(test)

    assert "localhost:4200/api/health" in probe("prefect-server")
    assert "ray status" in probe("ray-head")
    assert "pg_isready" in probe("postgres")
    assert "mc ready" in probe("minio")
    init = _command_text(services["minio-init"])
    assert "mc mb --ignore-existing" in init and "http://minio:9000" in init


def test_named_volumes_hold_the_state(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose.get("volumes") or {})
    assert {"minio-data", "postgres-data"} <= declared
    assert "minio-data:/data" in services["minio"]["volumes"]
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]


# ----------------------------------------------------------------------------- compose: secrets, vars


def test_no_literal_secrets(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for key, value in _env(svc).items():
            if not SECRET_KEY.search(key):
                continue
            # The whole value must be one interpolation: the secret comes from the environment/.env.
            found = list(_interpolations(value))
            assert found and re.fullmatch(r"\$\{[^}]*\}", value), f"{name}: {key} is a literal"
            for _var, op, default in found:
                assert op in (":-", "-", ":?", "?")
                if op in (":-", "-"):
                    assert default in LOCAL_DEV_SECRET_DEFAULTS, f"{name}: {key} default {default!r}"
        # Passwords embedded in URLs must be interpolated too.
        for key, value in _env(svc).items():
            m = re.search(r"://(?:\$\{[^}]*\}|[^:@/]*):(\$\{[^}]*\}|[^@/]*)@", value)
            if m:
                assert re.fullmatch(r"\$\{[^}]*\}", m.group(1)), f"{name}: {key} embeds a literal password"

    # With credentials in the environment, they win over the local-dev defaults.
    env = {"MINIO_ROOT_USER": "alice", "MINIO_ROOT_PASSWORD": "s3cr3t-value", "POSTGRES_PASSWORD": "pg-pw"}
    worker = {k: _resolve(v, env) for k, v in _env(services["prefect-worker"]).items()}
    assert (worker["AWS_ACCESS_KEY_ID"], worker["AWS_SECRET_ACCESS_KEY"]) == ("alice", "s3cr3t-value")
    server = _resolve(_env(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"], env)
    assert urlsplit(server).password == "pg-pw"

    # The local-dev defaults occur only as ${VAR:-default} fallbacks, and the file flags them.
    text = COMPOSE.read_text()
    for default in LOCAL_DEV_SECRET_DEFAULTS - {"prefect"}:  # "prefect" is also a user/db/CLI name
        bare = re.sub(r"\$\{[A-Z_]+:-" + default + r"\}", "", text)
        assert default not in re.sub(r"#.*", "", bare), f"literal {default} outside a default"
    assert "LOCAL-DEV" in text


def test_every_variable_has_a_default_and_is_documented(compose: dict[str, Any]) -> None:
    readme, example = README.read_text(), ENV_EXAMPLE.read_text()
    names: set[str] = set()
    for text in _strings(compose):
        # A bare `$VAR` would be interpolated by Compose on the host; shell code must use `$$`.
        assert not re.search(r"(?<!\$)\$(?!\$)[A-Za-z_]", text.replace("$$", "")), (
            f"unescaped $VAR in {text!r}: write $${{VAR}} for the container's shell"
        )
        for name, op, _word in _interpolations(text):
            names.add(name)
            assert op in (":-", "-"), f"${{{name}}} has no default; add one (or document it as required)"
    assert names, "expected interpolated variables"
    for name in names:
        assert f"`{name}`" in readme, f"{name} is not documented in infra/deploy/README.md"
        assert re.search(rf"^#?\s*{name}=", example, re.MULTILINE), f"{name} missing from env.example"


def _compose_cli() -> list[str] | None:
    """A Compose v2 CLI: the `docker compose` plugin, else a standalone v2 `docker-compose`."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cli in candidates:
        try:
            out = subprocess.run([*cli, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and re.search(r"v?2\.\d+", out.stdout):
            return cli
    return None


def test_docker_compose_config_validates() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip(
            "no Compose v2 CLI: `docker compose` (plugin) and a v2 `docker-compose` are both absent; "
            "`docker compose config -q` needs no engine, so install the compose plugin to run this check"
        )
    # Clean environment: defaults alone must give a valid file (a user's .env would also be read,
    # so point compose at an empty env file).
    env = {k: v for k, v in os.environ.items() if k in {"PATH", "HOME", "DOCKER_CONFIG"}}
    for profile_args in ([], ["--profile", "gpu"]):
        result = subprocess.run(
            [*cli, "--env-file", os.devnull, "-f", str(COMPOSE), *profile_args, "config", "-q"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- KubeRay


def test_kuberay_manifest_shape(raycluster: dict[str, Any]) -> None:
    ray = pytest.importorskip("ray", reason="ray is not installed in this venv; cannot compare rayVersion")
    assert raycluster["apiVersion"] == "ray.io/v1"
    spec = raycluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]["rayStartParams"]
    assert head["num-cpus"] == "0", "no work may land on the head"
    assert head.get("dashboard-host") == "0.0.0.0"
    for name, group in _ray_groups(raycluster):
        params = group.get("rayStartParams") or {}
        # KubeRay's CRD types rayStartParams as map[string]string: an unquoted 0 is rejected.
        assert all(isinstance(v, str) for v in params.values()), f"{name}: quote rayStartParams values"
    head_container = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["containerPort"] for p in head_container["ports"]}
    assert {6379, 8265} <= head_ports


def test_kuberay_gpu_workers_autoscale(raycluster: dict[str, Any]) -> None:
    workers = raycluster["spec"]["workerGroupSpecs"]
    gpu_groups = []
    for group in workers:
        replicas = group.get("replicas", group["minReplicas"])
        assert 0 <= group["minReplicas"] <= replicas <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
        for container in group["template"]["spec"]["containers"]:
            resources = container.get("resources", {})
            gpus = resources.get("limits", {}).get("nvidia.com/gpu")
            if gpus:
                assert int(gpus) >= 1
                # Extended resources: a request, if given, must equal the limit.
                assert resources.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus
                gpu_groups.append(group["groupName"])
    assert gpu_groups, "a worker group must request nvidia.com/gpu"


def test_kuberay_same_pinned_image_everywhere(raycluster: dict[str, Any]) -> None:
    images = set()
    for _name, group in _ray_groups(raycluster):
        for container in group["template"]["spec"]["containers"]:
            images.add(container["image"])
    autoscaler_image = (raycluster["spec"].get("autoscalerOptions") or {}).get("image")
    if autoscaler_image:
        images.add(autoscaler_image)
    assert len(images) == 1, f"all groups must run the same image, got {images}"
    (image,) = images
    repo, _, tag = image.rpartition(":")
    assert repo.rsplit("/", 1)[-1] == "quantfleet" and tag and "/" not in tag
    assert tag != "latest", "autoscaled pods must not drift: pin a tag"


def test_kuberay_credentials_come_from_a_secret(raycluster: dict[str, Any]) -> None:
    secrets = [doc for doc in yaml.safe_load_all(K8S_SECRET.read_text()) if doc]
    assert [doc["kind"] for doc in secrets] == ["Secret"]
    secret = secrets[0]
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}, "the template must hold placeholders only"
    assert all(doc.get("kind") != "Secret" for doc in _kuberay_docs()), (
        "keep the Secret out of the cluster manifest: re-applying it would clobber real credentials"
    )
    for name, group in _ray_groups(raycluster):
        pod = group["template"]["spec"]
        for container in pod["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert "value" not in env[key], f"{name}: {key} must not be a literal"
                ref = env[key]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
            for key, entry in env.items():
                if SECRET_KEY.search(key):
                    assert "value" not in entry, f"{name}: {key} is a literal"
            assert env["QUANTFLEET_S3_ENDPOINT_URL"]["value"].startswith(("http://", "https://"))
            mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
            shm = [vol for vol, path in mounts.items() if path == "/dev/shm"]
            assert shm, f"{name}: mount a memory emptyDir at /dev/shm for Ray's object store"
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            assert volumes[shm[0]]["emptyDir"]["medium"] == "Memory"
