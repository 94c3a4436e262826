"""Build the images docker/docker-compose.yml names and run the stack with podman + podman-compose.

Used by tests/e2e/test_compose.py (and bench/compose.py for its timings). Facts it relies on
(../shared/reference/containers.md): podman needs runc and no default ulimits on these machines (our
``containers.conf``, through ``CONTAINERS_CONF``, unless the caller set one); no image registry is reachable, so
a Debian base image is made with debootstrap and the images the compose file pulls from Docker Hub are
*stand-ins* built here from Debian and PyPI packages (Containerfiles next to this file), tagged with the compose
file's names; pip inside a build uses this machine's pip configuration (its index mirrors, wheel folders and
CA bundle are mounted read-only), so a build downloads what this machine would download and nothing else.

Everything a run starts (containers, network, volumes) belongs to one compose project and is removed by name.
Images stay (podman's layer cache makes the next build fast); stand-in tags carry the label
``molal.standin`` and never replace an image without it.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
BASE_IMAGE = "localhost/debian:bookworm"
PREFIX = "localhost/molal-ci"
#: stand-in Containerfile -> the name docker-compose.yml uses for that service's image
STANDINS = {
    "label-studio": "docker.io/heartexlabs/label-studio:1.23.2",
    "redis": "docker.io/library/redis:7-alpine",
    "postgres": "docker.io/library/postgres:16-alpine",
}
MOLAL_IMAGE = f"{PREFIX}/molal-backend:latest"
LLAMACPP_IMAGE = f"{PREFIX}/llamacpp:latest"
PYTHON_IMAGE = f"{PREFIX}/python:latest"
STANDIN_LABEL = "molal.standin"


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tools_missing() -> list[str]:
    need = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap"}
    missing = [pkg for tool, pkg in need.items() if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists())]
    if not podman_compose_cmd():
        missing.append("podman-compose (pip)")
    return missing


def podman_compose_cmd() -> list[str] | None:
    exe = Path(sys.executable).with_name("podman-compose")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("podman-compose")
    return [found] if found else None


@dataclass
class Podman:
    """Runs podman / podman-compose with this module's containers.conf; every command and its output go to
    ``log`` (a failure quotes its tail)."""

    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.env = {**os.environ, **self.env}
        self.env.setdefault("CONTAINERS_CONF", str(HERE / "containers.conf"))

    def run(self, argv: list[str], check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
        with self.log.open("ab") as f:
            f.write(f"\n$ {shlex.join(argv)}\n".encode())
        p = subprocess.run(argv, env=self.env, capture_output=True, timeout=timeout)
        with self.log.open("ab") as f:
            f.write(p.stdout[-20000:] + p.stderr[-20000:])
        if check and p.returncode != 0:
            tail = (p.stdout + p.stderr).decode(errors="replace")[-3000:]
            raise StackError(f"{shlex.join(argv[:4])} … failed (rc={p.returncode}):\n{tail}")
        return p

    def podman(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["podman", *args], **kw)

    def image_labels(self, name: str) -> dict[str, str] | None:
        p = self.podman("image", "inspect", "--format", "{{json .Labels}}", name, check=False)
        if p.returncode != 0:
            return None
        return json.loads(p.stdout.decode() or "null") or {}


def host_pip_config() -> tuple[str, list[str]]:
    """This machine's pip configuration as a pip.conf for builds, and the local folders it names (to mount
    read-only at the same paths). Index URLs and wheel folders only: nothing secret is in them here, and a
    credential in an index URL would stay in the build's mounted file, not in an image layer."""
    p = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    cfg: dict[str, str] = {}
    for line in p.stdout.splitlines():
        key, _, val = line.partition("=")
        scope, _, name = key.partition(".")
        if name in ("index-url", "extra-index-url", "find-links") and scope in ("global", ":env:"):
            cfg[name] = val.strip().strip("'\"")
    mounts: list[str] = []
    for name in ("index-url", "extra-index-url", "find-links"):
        for item in cfg.get(name, "").split():
            path = urlparse(item).path if item.startswith("file:") else (item if item.startswith("/") else "")
            if not path:
                continue
            top = Path(path)
            if top.name == "simple":  # a file:// index: mount the folder that holds it
                top = top.parent
            if top.exists() and str(top) not in mounts:
                mounts.append(str(top))
    # the host's CA bundle is in every image (the base image carries it): pip inside uses the image's copy
    text = "[global]\n" + "".join(f"{k} = {v}\n" for k, v in cfg.items())
    text += "cert = /etc/ssl/certs/ca-certificates.crt\n"
    return text, mounts


@dataclass
class Images:
    """Builds every image the stack needs; ``timings`` holds seconds per image."""

    pm: Podman
    work: Path
    wheels: list[str] = field(default_factory=list)  # extra wheel folders (e.g. CI's llama-cpp-python wheel)
    say: Callable[[str], None] = print
    timings: dict[str, float] = field(default_factory=dict)

    def build_all(self, skip: tuple[str, ...] = ()) -> dict[str, float]:
        """Every image, in order; one build at a time on this machine (a file lock: CI starts the builds early
        in the background and the test's own call then waits for them and finds podman's cache warm)."""
        with open(os.environ.get("MOLAL_COMPOSE_LOCK", "/tmp/molal-compose-build.lock"), "w") as lock:
            t0 = time.monotonic()
            fcntl.flock(lock, fcntl.LOCK_EX)
            waited = time.monotonic() - t0
            if waited > 1:
                self.timings["waited_for_other_build"] = round(waited, 1)
            return self._build_all(skip)

    def _build_all(self, skip: tuple[str, ...]) -> dict[str, float]:
        self.base()
        conf, mounts = host_pip_config()
        extra = [w for w in self.wheels if Path(w).is_dir()]
        if extra:
            if "find-links" in conf:
                conf = conf.replace("find-links = ", "find-links = " + " ".join(extra) + " ", 1)
            else:
                conf += "find-links = " + " ".join(extra) + "\n"
        pip_conf = self.work / "pip.conf"
        pip_conf.write_text(conf)
        vols = ["-v", f"{pip_conf}:/etc/pip.conf:ro"]
        for m in [*mounts, *extra]:
            vols += ["-v", f"{m}:{m}:ro"]
        self.build("python", HERE / "python.Containerfile", HERE, PYTHON_IMAGE, [])
        self.build("label-studio", HERE / "label-studio.Containerfile", HERE, f"{PREFIX}/label-studio:latest",
                   [*vols, "--build-arg", f"PYTHON_IMAGE={PYTHON_IMAGE}"])
        self.build("redis", HERE / "redis.Containerfile", HERE, f"{PREFIX}/redis:latest", [])
        self.build("postgres", HERE / "postgres.Containerfile", HERE, f"{PREFIX}/postgres:latest", [])
        for name, target in STANDINS.items():
            self.tag_standin(f"{PREFIX}/{name}:latest", target)
        # the two images of docker/ itself, as a user builds them, with a Python base made here and torch's
        # CPU wheel found through pip's configuration (PyTorch's own index is not reachable from here)
        self.build("molal", DOCKER / "Dockerfile", ROOT, MOLAL_IMAGE,
                   [*vols, "--ignorefile", str(DOCKER / "Dockerfile.dockerignore"),
                    "--build-arg", f"BASE_IMAGE={PYTHON_IMAGE}",
                    "--build-arg", f"TORCH_INDEX_URL={os.environ.get('MOLAL_COMPOSE_TORCH_INDEX', 'https://pypi.org/simple')}"])
        if "llamacpp" not in skip:
            self.build("llamacpp", DOCKER / "llamacpp.Dockerfile", DOCKER, LLAMACPP_IMAGE,
                       [*vols, "--build-arg", f"BASE_IMAGE={PYTHON_IMAGE}"])
        return self.timings

    def base(self) -> None:
        """``localhost/debian:bookworm`` from Debian's packages (debootstrap, needs root), with this machine's CA
        bundle both as the system bundle and as a local CA (so installing ``ca-certificates`` keeps it)."""
        if self.pm.image_labels(BASE_IMAGE) is not None:
            self.timings.setdefault("base", 0.0)
            return
        t0 = time.monotonic()
        self.say("debootstrap bookworm (minbase) …")
        rootfs = self.work / "rootfs"
        mirror = os.environ.get("MOLAL_COMPOSE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
        self.pm.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), mirror], timeout=1200)
        bundle = Path(os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
        for dest in (rootfs / "etc/ssl/certs/ca-certificates.crt",
                     rootfs / "usr/local/share/ca-certificates/host-ca-bundle.crt"):
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle, dest)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(["podman", "import", "-q", "-", BASE_IMAGE], stdin=tar.stdout, env=self.pm.env,
                             capture_output=True)
        tar.wait()
        if imp.returncode != 0 or tar.returncode != 0:
            raise StackError(f"podman import of the Debian base failed: {imp.stderr.decode()[-2000:]}")
        subprocess.run(["rm", "-rf", str(rootfs)], check=False)
        self.timings["base"] = round(time.monotonic() - t0, 1)

    def build(self, key: str, containerfile: Path, context: Path, tag: str, args: list[str]) -> None:
        t0 = time.monotonic()
        self.say(f"podman build {key} …")
        label = ["--label", f"{STANDIN_LABEL}={key}"] if containerfile.parent == HERE else []
        # docker format: podman's default (OCI) drops a Containerfile's HEALTHCHECK
        self.pm.podman("build", "--format", "docker", "-f", str(containerfile), *label, *args, "-t", tag, str(context),
                       timeout=3000)
        self.timings[key] = round(time.monotonic() - t0, 1)

    def tag_standin(self, image: str, target: str) -> None:
        have = self.pm.image_labels(target)
        if have is not None and STANDIN_LABEL not in have:
            raise StackError(f"{target} exists and is not a molal stand-in: not replacing it (podman rmi it first)")
        self.pm.podman("tag", image, target)


@dataclass
class Stack:
    """One compose project of docker/docker-compose.yml, run by podman-compose with a generated env file."""

    pm: Podman
    work: Path
    project: str = "molalci"
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.env_file = self.work / "stack.env"
        if not self.env:
            self.env = self.default_env()
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in self.env.items()))
        self.env_file.chmod(0o600)

    @staticmethod
    def default_env() -> dict[str, str]:
        """Every variable of .env.example, with fresh secrets, free host ports, the CPU LLM profile and the
        images built here."""
        env: dict[str, str] = {}
        for line in (DOCKER / ".env.example").read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#") and "=" in line:
                k, _, v = line.partition("=")
                env[k.strip()] = v.strip()
        env.update({
            "COMPOSE_PROFILES": "cpu-llm",
            "MOLAL_MIXTURE_FILE": "./mixture.cpu-llm.example.toml",
            # published on loopback only during the test (the compose file's "${LABEL_STUDIO_PORT}:8080")
            "LABEL_STUDIO_PORT": f"127.0.0.1:{free_port()}",
            "MOLAL_PORT": str(free_port()),
            "LABEL_STUDIO_USERNAME": "compose@molal.local",
            "LABEL_STUDIO_PASSWORD": secrets.token_hex(12),
            "LABEL_STUDIO_USER_TOKEN": secrets.token_hex(20),
            "POSTGRES_PASSWORD": secrets.token_hex(16),
            "BASIC_AUTH_USER": "labelstudio",
            "BASIC_AUTH_PASS": secrets.token_hex(16),
            "VLLM_API_KEY": secrets.token_hex(16),
            "MOLAL_IMAGE": MOLAL_IMAGE,
            "LLAMACPP_IMAGE": LLAMACPP_IMAGE,
            "MOLAL_WORKERS": "1",
            "MOLAL_THREADS": "4",
        })
        return env

    # -- compose ------------------------------------------------------------------------------------------
    def compose(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        cmd = [*podman_compose_cmd(), "-p", self.project, "-f", str(COMPOSE_FILE), "--env-file", str(self.env_file)]
        return self.pm.run([*cmd, *args], check=check, timeout=timeout)

    def up(self) -> None:
        self.compose("up", "-d")

    def down(self, volumes: bool = False) -> None:
        self.compose("down", *(["-v"] if volumes else []), check=False, timeout=300)

    def remove_all(self) -> None:
        """Containers, network and volumes of this project, by name (also what a killed run left)."""
        self.down(volumes=True)
        label = f"label=io.podman.compose.project={self.project}"
        names = self.pm.podman("ps", "-a", "--filter", label, "--format", "{{.Names}}", check=False).stdout.split()
        if names:
            self.pm.podman("rm", "-f", *(n.decode() for n in names), check=False)
        vols = self.pm.podman("volume", "ls", "--filter", label, "--format", "{{.Name}}", check=False).stdout.split()
        if vols:
            self.pm.podman("volume", "rm", "-f", *(v.decode() for v in vols), check=False)
        self.pm.podman("network", "rm", "-f", f"{self.project}_default", check=False)

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def healthcheck(self, service: str) -> bool:
        """Runs the image's / compose file's healthcheck once (podman runs them on a timer only under systemd)."""
        return self.pm.podman("healthcheck", "run", self.container(service), check=False).returncode == 0

    def wait_healthy(self, services: list[str], timeout: float = 600) -> float:
        t0 = time.monotonic()
        pending = list(services)
        while pending:
            pending = [s for s in pending if not self.healthcheck(s)]
            if not pending:
                break
            if time.monotonic() - t0 > timeout:
                raise StackError(f"not healthy after {timeout:.0f} s: {pending}\n" + self.logs(*pending))
            time.sleep(3)
        return round(time.monotonic() - t0, 1)

    def logs(self, *services: str, tail: int = 40) -> str:
        out = []
        for s in services:
            p = self.pm.podman("logs", "--tail", str(tail), self.container(s), check=False)
            out.append(f"--- {s} ---\n" + (p.stdout + p.stderr).decode(errors="replace"))
        return "\n".join(out)

    def state(self, service: str) -> str:
        p = self.pm.podman("inspect", "--format", "{{.State.Status}}", self.container(service), check=False)
        return p.stdout.decode().strip() or "missing"

    def psql(self, sql: str, db: str = "molal") -> str:
        p = self.pm.podman("exec", self.container("postgres"), "psql", "-At", "-U", self.env["POSTGRES_USER"],
                           "-d", db, "-c", sql)
        return p.stdout.decode().strip()

    @property
    def ls_url(self) -> str:
        return f"http://127.0.0.1:{self.env['LABEL_STUDIO_PORT'].rsplit(':', 1)[-1]}"

    @property
    def backend_url(self) -> str:
        """The backend's published port on loopback, with its basic-auth user in the URL (httpx sends it)."""
        return f"http://{self.env['BASIC_AUTH_USER']}:{self.env['BASIC_AUTH_PASS']}@127.0.0.1:{self.env['MOLAL_PORT']}"


def new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="molal-compose-"))


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.compose.stack build [--skip llamacpp] [--wheels DIR]``: build the images ahead of the
    test (standard library only, so it runs before the test environment is installed); prints the timings."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tests.compose.stack")
    ap.add_argument("command", choices=["build"])
    ap.add_argument("--skip", action="append", default=[], choices=["llamacpp"])
    ap.add_argument("--wheels", action="append", default=[])
    args = ap.parse_args(argv)
    work = new_workdir()
    images = Images(Podman(work / "podman.log"), work, wheels=args.wheels,
                    say=lambda m: print(m, flush=True))
    try:
        print(json.dumps(images.build_all(skip=tuple(args.skip))), flush=True)
    except StackError as exc:
        print(f"image build failed: {exc}\n(log: {work / 'podman.log'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
