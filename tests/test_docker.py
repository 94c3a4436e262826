"""Static checks of docker/ (no Docker on these machines): the compose file, the Dockerfile, .env.example
and the mixture example must reference each other consistently."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    out = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def test_services_present(compose):
    assert {"label-studio", "molal", "molal-worker", "redis"} <= set(compose["services"])
    vllm = [n for n, s in compose["services"].items() if "vllm" in str(s.get("image", ""))]
    assert vllm, "at least one vllm serve container"
    for n in vllm:
        devs = compose["services"][n]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] for d in devs)


def test_every_variable_is_documented(compose, env_example):
    text = (DOCKER / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)(?::?-[^}]*)?\}", text))
    assert used, "compose takes its configuration from the environment"
    missing = used - set(env_example)
    assert not missing, f"variables used in docker-compose.yml but not in .env.example: {sorted(missing)}"


def test_settings_env_names_are_real(compose):
    """Every MOLAL_*/LABEL_STUDIO_* variable given to the backend is one molal.config.Settings reads."""
    from molal.config import Settings

    names = set()
    for f in Settings.model_fields.values():
        alias = f.validation_alias
        names |= set(getattr(alias, "choices", [alias]))
    backend_env = _env(compose["services"]["molal"])
    for k in backend_env:
        if k.startswith(("MOLAL_", "LABEL_STUDIO_")) or k in ("MODEL_DIR", "REDIS_URL", "BASIC_AUTH_USER"):
            assert k in names, f"{k} is not read by molal.config.Settings"


def test_urls_point_at_services_and_ports(compose):
    services = compose["services"]
    env = _env(services["molal"])
    ls = urlparse(env["LABEL_STUDIO_URL"])
    assert ls.hostname == "label-studio" and ls.port == 8080
    assert any(p.endswith(":8080") for p in services["label-studio"]["ports"])
    redis = urlparse(env["REDIS_URL"])
    assert redis.hostname in services and redis.port == 6379
    # the backend listens where the compose maps it, the Dockerfile exposes it and the healthcheck asks
    assert env["PORT"] == "9090" and any(p.endswith(":9090") for p in services["molal"]["ports"])
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "EXPOSE 9090" in dockerfile
    # the worker shares the backend's configuration and state volume
    assert _env(services["molal-worker"]) == env
    assert services["molal-worker"]["volumes"] == services["molal"]["volumes"]
    assert services["molal-worker"]["command"][:2] == ["molal", "worker"]


def test_mixture_example_targets_vllm_services(compose):
    import tomllib

    from molal.annotators import Mixture

    services = compose["services"]
    mounted = [v for v in services["molal"]["volumes"] if ":/config/mixture.toml" in v]
    assert mounted
    src = (DOCKER / mounted[0].split(":")[0]).resolve()
    assert src.exists()
    assert _env(services["molal"])["MOLAL_MIXTURE"] in ("${MOLAL_MIXTURE:-}", "/config/mixture.toml")
    cfg = tomllib.loads(src.read_text())
    backend_env = _env(services["molal"])
    for ann in cfg["annotator"]:
        u = urlparse(ann["base_url"])
        assert u.hostname in services, f"{ann['base_url']} is not a compose service"
        cmd = services[u.hostname]["command"]
        assert cmd[cmd.index("--port") + 1] == str(u.port)
        model_var = cmd[cmd.index("--model") + 1]
        assert model_var.startswith("${")
        assert ann["api_key_env"] in backend_env, "the backend must receive the vLLM key variable"
    # it is a valid mixture for molal (parsing does not contact the servers)
    mix = Mixture.from_config(src)
    assert mix.llm_names == [a["name"] for a in cfg["annotator"]]


def test_dockerfile_non_root_healthcheck_gunicorn():
    text = (DOCKER / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD .*/health", text, re.M)
    assert "molal serve" in text  # molal serve execs gunicorn backend.wsgi:app
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for part in src.split():
            assert (REPO / part).exists(), f"Dockerfile copies missing {part}"


def test_cli_commands_used_by_images_exist():
    from typer.main import get_command

    from molal.cli.main import app

    cmds = set(get_command(app).commands)
    assert {"serve", "worker"} <= cmds
