"""Static checks of docker/ (these machines run no Docker engine): the compose file, the Dockerfile, the
.env.example and the mixture examples must reference each other consistently, and the mixture examples must
load with molal's real loader (no server is contacted: annotators connect lazily)."""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from molal.annotators import Mixture

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / ".env.example"

VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
EXPECTED = {"label-studio", "molal", "molal-worker", "redis", "postgres", "vllm-qwen", "vllm-llama"}
WELL_KNOWN_PORTS = {"redis": 6379, "postgres": 5432}


# -- helpers -------------------------------------------------------------------------------------------------
def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        k, sep, v = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k), f".env.example: bad line {line!r}"
        assert k not in out, f".env.example: {k} defined twice"
        out[k] = v
    return out


def interpolate(value, env: dict[str, str]):
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR:?error} over nested data, with ``env`` as the .env."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        v = env.get(name)
        if op in (":-", "-"):
            return v if (v if op == ":-" else v is not None) else arg
        if op in (":?", "?"):
            assert v, f"${{{name}}} is required ({arg}) but empty in .env.example"
        return v or ""

    return VAR_RE.sub(sub, value)


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return env_example()


@pytest.fixture(scope="module")
def compose(raw, env) -> dict:
    return interpolate(raw, env)


def service_env(svc: dict) -> dict[str, str]:
    e = svc.get("environment") or {}
    if isinstance(e, list):
        e = dict(x.split("=", 1) for x in e)
    return {k: "" if v is None else str(v) for k, v in e.items()}


def container_port(svc: dict) -> int | None:
    """The port a service listens on inside the network: --port in its command, else its published target."""
    cmd = svc.get("command") or []
    cmd = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
    if "--port" in cmd:
        return int(cmd[cmd.index("--port") + 1])
    for p in svc.get("ports") or []:
        return int(str(p).rsplit(":", 1)[1].split("/")[0])
    return None


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, rest in dockerfile_instructions():
        if op == "ENV":
            for tok in shlex.split(rest):
                k, _, v = tok.partition("=")
                env[k] = v
    return env


def exec_form(rest: str) -> list[str]:
    args = json.loads(rest)
    assert isinstance(args, list) and all(isinstance(a, str) for a in args), rest
    return args


# -- compose -------------------------------------------------------------------------------------------------
def test_compose_services_and_references(compose) -> None:
    services = compose["services"]
    assert EXPECTED <= set(services), f"missing services: {EXPECTED - set(services)}"
    ports = {name: container_port(s) for name, s in services.items()}
    ports.update({k: v for k, v in WELL_KNOWN_PORTS.items() if ports.get(k) is None})
    ports["molal"] = 9090
    checked = 0
    for name, svc in services.items():
        deps = svc.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else list(deps):
            assert dep in services, f"{name}: depends_on unknown service {dep!r}"
        for key, val in service_env(svc).items():
            for url in re.findall(r"\b(?:https?|redis|postgresql)://[^\s\"']+", val):
                u = urlparse(url)
                assert u.hostname != "localhost" and u.hostname != "127.0.0.1", (
                    f"{name}.{key}={url}: inside a container localhost is the container itself")
                assert u.hostname in services, f"{name}.{key}={url}: no service {u.hostname!r}"
                assert u.port == ports[u.hostname], f"{name}.{key}={url}: {u.hostname} listens on {ports[u.hostname]}"
                checked += 1
    assert checked >= 4


def test_compose_molal_and_worker(compose) -> None:
    s = compose["services"]
    molal, worker = s["molal"], s["molal-worker"]
    assert molal["build"]["context"] == ".." and molal["build"]["dockerfile"] == "docker/Dockerfile"
    assert (COMPOSE.parent / molal["build"]["context"] / molal["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert worker["image"] == molal["image"], "the worker runs the backend's image"
    cmd = worker["command"]
    assert (shlex.split(cmd) if isinstance(cmd, str) else cmd) == ["molal", "worker"]
    assert worker.get("healthcheck", {}).get("disable") is True, "the image's HTTP healthcheck does not fit a worker"
    me, we = service_env(molal), service_env(worker)
    for e in (me, we):
        assert e["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert e["REDIS_URL"].startswith("redis://redis:6379")
        assert e["LABEL_STUDIO_API_KEY"] and e["MODEL_DIR"] == "/data"
        assert "BASIC_AUTH_USER" in e and "BASIC_AUTH_PASS" in e
    # both see the same state (MODEL_DIR) and the same mixture file
    assert molal["volumes"] == worker["volumes"]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in molal["volumes"]}
    assert mounts["/data"] in compose["volumes"], "MODEL_DIR is a named volume"
    assert me["MOLAL_MIXTURE"] in mounts, "MOLAL_MIXTURE names the mounted file"
    assert (DOCKER / mounts[me["MOLAL_MIXTURE"]]).is_file()
    assert {"redis", "label-studio"} <= set(molal["depends_on"]) and "redis" in worker["depends_on"]
    # shared state in PostgreSQL (molal's own database), started before either
    for svc, e in ((molal, me), (worker, we)):
        db = urlparse(e["MOLAL_DATABASE_URL"])
        assert db.scheme == "postgresql" and db.hostname == "postgres" and db.path == "/molal"
        assert db.password == service_env(s["postgres"])["POSTGRES_PASSWORD"] and db.password.isalnum()
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert me["LABEL_STUDIO_API_KEY"] == service_env(s["label-studio"])["LABEL_STUDIO_USER_TOKEN"]


def test_compose_ports_match_dockerfile_and_gunicorn(compose, monkeypatch) -> None:
    expose = [int(p) for op, rest in dockerfile_instructions() if op == "EXPOSE" for p in rest.split()]
    assert expose == [9090]
    molal = compose["services"]["molal"]
    bind = service_env(molal).get("MOLAL_BIND") or dockerfile_env()["MOLAL_BIND"]
    assert dockerfile_env()["MOLAL_BIND"] == "0.0.0.0:9090" and bind == "0.0.0.0:9090"
    # backend/gunicorn.conf.py really binds what MOLAL_BIND says
    monkeypatch.setenv("MOLAL_BIND", bind)
    conf = runpy.run_path(str(ROOT / "backend" / "gunicorn.conf.py"))
    assert conf["bind"] == bind
    targets = [int(str(p).rsplit(":", 1)[1]) for p in molal["ports"]]
    assert targets == expose
    assert all(str(p).startswith("127.0.0.1:") for p in molal["ports"]), "backend published on loopback only"
    assert container_port(compose["services"]["label-studio"]) == 8080


def test_compose_label_studio(compose, raw) -> None:
    ls = compose["services"]["label-studio"]
    assert raw["services"]["label-studio"]["image"] == "heartexlabs/label-studio:1.23.2"
    e = service_env(ls)
    assert e["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert e["LABEL_STUDIO_ML_BLOCK_LOCAL_IP"] == "false"
    assert e["LABEL_STUDIO_SSRF_PROTECTION_ENABLED"] == "false"
    assert e["LABEL_STUDIO_SENTRY_DSN"] == "" and e["LABEL_STUDIO_FRONTEND_SENTRY_DSN"] == ""  # no telemetry
    assert len(e["LABEL_STUDIO_USER_TOKEN"]) > 5 and e["LABEL_STUDIO_USERNAME"] and e["LABEL_STUDIO_PASSWORD"]
    assert any(str(v).endswith(":/label-studio/data") for v in ls["volumes"])
    # Label Studio on PostgreSQL: its own database, which the postgres service creates (POSTGRES_DB)
    pg = compose["services"]["postgres"]
    assert e["DJANGO_DB"] == "default" and e["POSTGRE_HOST"] == "postgres" and e["POSTGRE_PORT"] == "5432"
    assert e["POSTGRE_NAME"] == service_env(pg)["POSTGRES_DB"] != "molal"
    assert (e["POSTGRE_USER"], e["POSTGRE_PASSWORD"]) == (service_env(pg)["POSTGRES_USER"],
                                                          service_env(pg)["POSTGRES_PASSWORD"])
    assert ls["depends_on"]["postgres"]["condition"] == "service_healthy"
    init = {str(v).split(":")[1]: str(v).split(":")[0] for v in pg["volumes"]}
    sql = (DOCKER / init["/docker-entrypoint-initdb.d/10-molal.sql"]).read_text()
    assert "CREATE DATABASE molal;" in sql  # molal's database (MOLAL_DATABASE_URL) exists on first start
    assert not pg.get("ports"), "PostgreSQL is reachable only on the compose network"


def test_compose_vllm_servers(compose, env) -> None:
    s = compose["services"]
    vllm = [n for n in s if n.startswith("vllm-")]
    assert len(vllm) >= 2
    for n in vllm:
        svc = s[n]
        assert svc["image"].startswith("vllm/vllm-openai"), n
        assert "--model" in svc["command"] and container_port(svc) == 8000
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devices), n
        assert service_env(svc)["VLLM_API_KEY"] == env["VLLM_API_KEY"]
        assert not svc.get("ports"), f"{n}: only reachable on the compose network"


def test_backend_env_names_are_read_by_molal(compose) -> None:
    """Every molal setting given to the backend/worker is one molal.config.Settings (or gunicorn.conf) reads."""
    from molal.config import Settings

    names = {"MOLAL_BIND", "MOLAL_WORKERS", "MOLAL_THREADS", "VLLM_API_KEY"}  # gunicorn.conf.py; mixture key
    for f in Settings.model_fields.values():
        alias = f.validation_alias
        names |= set(getattr(alias, "choices", [alias]))
    for svc in ("molal", "molal-worker"):
        for k in service_env(compose["services"][svc]):
            assert k in names, f"{svc}: {k} is read by nothing in molal"


def test_cli_commands_used_by_the_images_exist() -> None:
    from typer.main import get_command

    from molal.cli.main import app

    assert {"serve", "worker"} <= set(get_command(app).commands)


def test_every_compose_variable_is_in_env_example(raw, env) -> None:
    used = set(VAR_RE.findall(COMPOSE.read_text()))
    names = {u[0] for u in used}
    missing = sorted(names - set(env))
    assert not missing, f"used in docker-compose.yml but not in .env.example: {missing}"
    unused = sorted(set(env) - names - {"COMPOSE_PROFILES"})  # read by compose itself
    assert not unused, f"in .env.example but unused by docker-compose.yml: {unused}"
    # a default in the compose file agrees with .env.example, so running without .env behaves the same
    for name, op, default in used:
        if op in (":-", "-") and default:
            assert default == env[name], f"${{{name}:-{default}}} vs .env.example {name}={env[name]}"


def test_profiles_pick_the_llm_servers(compose, env) -> None:
    """gpu = the vLLM servers, cpu-llm = llama.cpp on CPU; every other service starts with any profile; the
    profile .env.example selects exists."""
    services = compose["services"]
    profiles = {n: set(svc.get("profiles", [])) for n, svc in services.items()}
    assert {n for n, p in profiles.items() if p} == {"vllm-qwen", "vllm-llama", "llamacpp"}
    assert profiles["vllm-qwen"] == profiles["vllm-llama"] == {"gpu"} and profiles["llamacpp"] == {"cpu-llm"}
    chosen = {p for p in env["COMPOSE_PROFILES"].split(",") if p}
    assert chosen and chosen <= set().union(*profiles.values())


def test_cpu_llm_mixture_points_at_the_llamacpp_service(compose, env) -> None:
    svc = compose["services"]["llamacpp"]
    dockerfile = DOCKER / svc["build"]["dockerfile"]
    assert (DOCKER / svc["build"]["context"]).resolve() == DOCKER and dockerfile.exists()
    text = dockerfile.read_text()
    alias = re.search(r"LLAMA_MODEL_ALIAS=(\S+)", text).group(1)
    assert "--port 8000" in text and "--host 0.0.0.0" in text
    mix = Mixture.from_config(DOCKER / "mixture.cpu-llm.example.toml")
    llms = [a for a in mix.annotators if getattr(a, "base_url", None)]
    assert len(llms) == 1 and llms[0].base_url.rstrip("/") == "http://llamacpp:8000/v1" and llms[0].model == alias
    # molal sends VLLM_API_KEY; the server requires the key it gets as LLM_API_KEY
    assert llms[0].api_key_env == "VLLM_API_KEY" and service_env(svc)["LLM_API_KEY"] == env["VLLM_API_KEY"]


# -- mixtures ------------------------------------------------------------------------------------------------
def test_gpu_mixture_loads_and_points_at_vllm_services(compose, env) -> None:
    services = compose["services"]
    molal_env = service_env(services["molal"])
    mix = Mixture.from_config(DOCKER / "mixture.example.toml")
    assert len(mix) >= 2
    served = {}
    for n, svc in services.items():
        if n.startswith("vllm-"):
            cmd = [str(c) for c in svc["command"]]
            served[n] = cmd[cmd.index("--model") + 1]
    used_services = set()
    for a in mix.annotators:
        assert a.type == "openai", a
        u = urlparse(a.base_url)
        assert u.hostname in services and u.hostname.startswith("vllm-"), a.base_url
        assert u.port == container_port(services[u.hostname]) and u.path.rstrip("/") == "/v1", a.base_url
        assert a.model == served[u.hostname], f"{a.name}: model {a.model!r} but {u.hostname} serves {served[u.hostname]!r}"
        assert a.api_key_env in molal_env, f"{a.name}: {a.api_key_env} is not in the molal environment"
        used_services.add(u.hostname)
    assert used_services == set(served), "every vLLM server is used by the mixture"
    mount = next(str(v) for v in services["molal"]["volumes"] if str(v).endswith(":/config/mixture.toml:ro"))
    assert mount.split(":")[0] == env["MOLAL_MIXTURE_FILE"] == "./mixture.example.toml"


def test_cpu_mixture_needs_no_server() -> None:
    mix = Mixture.from_config(DOCKER / "mixture.cpu.example.toml")
    assert len(mix) >= 2 and all(a.type == "embedding" for a in mix.annotators)


# -- Dockerfile ----------------------------------------------------------------------------------------------
def test_dockerfile_basics() -> None:
    ins = dockerfile_instructions()
    ops = [op for op, _ in ins]
    # the base image is a build argument (a stand-in where no registry is reachable), python:3.11-slim by default
    assert ins[0] == ("ARG", "BASE_IMAGE=python:3.11-slim") and ins[1] == ("FROM", "${BASE_IMAGE}")
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    args = {rest.split("=")[0]: rest.split("=", 1)[1] for op, rest in ins if op == "ARG"}
    assert args["TORCH_VERSION"] == "2.13.0" and "download.pytorch.org/whl/cpu" in args["TORCH_INDEX_URL"]
    assert 'torch==${TORCH_VERSION}' in runs and 'pip install --no-deps ".[postgres]"' in runs
    assert runs.index("torch==") < runs.index("pip install -r"), "torch (CPU) before the other dependencies"
    # layer order: the dependencies (from pyproject.toml alone) before molal's code is copied in
    deps = next(i for i, (op, rest) in enumerate(ins) if op == "RUN" and "pip install -r" in rest)
    code = next(i for i, (op, rest) in enumerate(ins) if op == "COPY" and rest.startswith("molal"))
    assert ins.index(("COPY", "pyproject.toml README.md ./")) < deps < code
    for op, rest in ins:
        if op == "COPY":
            for src in shlex.split(rest)[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the build context"
    users = [rest for op, rest in ins if op == "USER"]
    assert users, "the image must not run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert "useradd" in runs and user in runs
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN"), "nothing runs as root after USER"
    assert dockerfile_env()["MODEL_DIR"] == "/data"
    hc = [rest for op, rest in ins if op == "HEALTHCHECK"]
    assert len(hc) == 1 and "/health" in hc[0]
    probe = exec_form(hc[0][hc[0].index("CMD") + 3:].strip())
    assert probe[0] == "python", "the slim image has python, not curl"


def test_dockerfile_cmd_mirrors_molal_serve() -> None:
    cmd = exec_form([rest for op, rest in dockerfile_instructions() if op == "CMD"][-1])
    assert not [op for op, _ in dockerfile_instructions() if op == "ENTRYPOINT"]
    assert cmd[:3] == ["python", "-m", "gunicorn"]
    conf = cmd[cmd.index("-c") + 1]
    assert conf == "/app/backend/gunicorn.conf.py" and (ROOT / "backend" / "gunicorn.conf.py").is_file()
    assert cmd[-1] == "backend.wsgi:app"
    # the same pieces `molal serve` execs
    src = (ROOT / "molal" / "cli" / "server.py").read_text()
    assert '"-m", "gunicorn", "-c"' in src and '"backend.wsgi:app"' in src


def test_dockerignore_keeps_what_the_build_copies() -> None:
    lines = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**" in lines
    for op, rest in dockerfile_instructions():
        if op == "COPY":
            for src in shlex.split(rest)[:-1]:
                assert f"!{src}" in lines or f"!{src}/**" in lines, src


def test_wsgi_app_is_importable(tmp_path: Path) -> None:
    """``backend.wsgi:app`` (the CMD's module path) imports in the venv and answers /health."""
    code = (
        "import importlib; m = importlib.import_module('backend.wsgi'); app = m.app; "
        "r = app.test_client().get('/health'); print(type(app).__name__, r.status_code)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MOLAL_MIXTURE", "BASIC_AUTH_USER")}
    env["MODEL_DIR"] = str(tmp_path / "data")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split()[-2:] == ["Flask", "200"], p.stdout


def test_compose_test_builds_a_stand_in_for_every_pulled_image(compose) -> None:
    """tests/e2e/test_compose.py runs the stack where no registry is reachable: every image the compose file
    pulls (outside the gpu profile) has a stand-in tagged with its name; the rest are built from docker/."""
    from tests.compose.stack import STANDINS

    pulled = {}
    for name, svc in compose["services"].items():
        if "gpu" in svc.get("profiles", []):
            continue
        if "build" not in svc:
            image = svc["image"]
            pulled[name] = image if image.count("/") >= 2 else "docker.io/" + (image if "/" in image else f"library/{image}")
    assert pulled == STANDINS
