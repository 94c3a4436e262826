"""The annotate stage: LLM annotators (OpenAI-compatible HTTP, vLLM, HF transformers, embedding zero-shot,
replay of recordings), the :class:`Mixture` of them, and its cached, deadline-bounded annotation.

Heavy backends are imported lazily (``import molal.annotators`` stays cheap)."""

from __future__ import annotations

from molal.annotators.base import (
    Annotator,
    AnnotatorError,
    AnnotatorResult,
    AnnotatorUnavailable,
    ConfigError,
    consistency_from_answers,
    match_answer,
)
from molal.annotators.mixture import Mixture, MixtureResult, build_annotator
from molal.annotators.prompts import Prompt

_LAZY = {
    "EmbeddingAnnotator": "molal.annotators.embedding",
    "ReplayAnnotator": "molal.annotators.replay",
    "HFAnnotator": "molal.annotators.hf",
    "OpenAIAnnotator": "molal.annotators.openai_compat",
    "VLLMAnnotator": "molal.annotators.vllm",
    "AnnotationCache": "molal.cache",
}

__all__ = [
    "Annotator",
    "AnnotatorError",
    "AnnotatorResult",
    "AnnotatorUnavailable",
    "ConfigError",
    "Mixture",
    "MixtureResult",
    "Prompt",
    "build_annotator",
    "consistency_from_answers",
    "match_answer",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'molal.annotators' has no attribute {name!r}")
