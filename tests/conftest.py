"""Shared fixtures: paths to the real shared data, tiny local models built on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


def _shared_data() -> Path:
    env = os.environ.get("MOLAL_SHARED_DATA")
    if env:
        return Path(env)
    return REPO.parent / "shared" / "data"


SHARED_DATA = _shared_data()
TREC_CLASSES = ["abbreviation", "entity", "description", "human", "location", "numeric"]
TREC_LLMS = ["gemma", "llama", "mistral", "qwen", "yi"]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "trec").exists():
        pytest.fail(f"shared data not found at {SHARED_DATA} (set MOLAL_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def trec_recorded_paths(shared_data: Path) -> list[Path]:
    return [shared_data / "llm-outputs" / "trec" / f"{m}.jsonl" for m in TREC_LLMS]


@pytest.fixture(scope="session")
def trec_outputs(trec_recorded_paths):
    from molal import LLMOutputs

    return LLMOutputs.from_recorded_jsonl(trec_recorded_paths, TREC_CLASSES)


@pytest.fixture(scope="session")
def trec_gold(shared_data: Path):
    from molal import load_dataset

    return load_dataset(shared_data / "llm-outputs" / "trec" / "yi.jsonl", class_names=TREC_CLASSES).labels
