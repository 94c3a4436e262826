"""Embedding zero-shot scorer: cosine similarity between a text and its class prompts, softmaxed.

The text and each class prompt (one or several templates, e.g. ``"This text is about {label}."``,
``"{label}"``, ``"{description}"``) are embedded with a sentence encoder (mean pooling over tokens,
L2-normalised; the bundled all-MiniLM-L6-v2 by default, loaded offline). A class's embedding is the
normalised mean of its template embeddings; ``probs = softmax(cos(text, class) / temperature)``.

Self-consistency (``samples > 0``): T stochastic forward passes of the text with the encoder's dropout on
(MC dropout, seeded), each "answers" the argmax class; consistency is the fraction of passes per class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from molal.annotators.base import (
    Annotator,
    AnnotatorError,
    AnnotatorResult,
    DeadlineReached,
    check_float,
    check_name,
    check_positive_int,
    current_deadline,
    softmax,
)
from molal.embeddings import EmbeddingDeadline, EncoderError, dropout_embeddings, embed, model_fingerprint

DEFAULT_TEMPLATES = ["This text is about {label}."]


class EmbeddingAnnotator(Annotator):
    """Zero-shot classifier from sentence-embedding similarity (offline; the default mixture's members).

    Args:
        name: display name.
        templates: class prompt templates with ``{label}`` and/or ``{description}`` (a template with
            ``{description}`` falls back to ``{label}`` for classes without a description).
        model: encoder folder or ``"minilm"`` (bundled all-MiniLM-L6-v2).
        temperature: softmax temperature on cosine similarities.
        text_template: how the text itself is wrapped before embedding (``"{text}"``).
        samples: T MC-dropout passes for self-consistency (0 = none).
    """

    type = "embedding"
    kind = "scorer"  # not a language model: its predictions say so (model version scorer:<name>)

    _runtime = {"_class_cache": dict}

    def __init__(
        self,
        name: str,
        templates: Sequence[str] | str = tuple(DEFAULT_TEMPLATES),
        model: str = "minilm",
        temperature: float = 0.05,
        text_template: str = "{text}",
        samples: int = 0,
        seed: int = 0,
        batch_size: int = 64,
        max_length: int = 128,
        device: str = "auto",
    ) -> None:
        self.name = check_name(name)
        if isinstance(templates, str):
            templates = [templates]
        templates = list(templates)
        if not templates:
            raise ValueError("templates must list at least one class prompt template")
        for i, t in enumerate(templates):
            if not isinstance(t, str) or ("{label}" not in t and "{description}" not in t):
                raise ValueError(f"templates[{i}] = {t!r} must contain {{label}} or {{description}}")
            try:
                t.format(label="x", description="y")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"templates[{i}] = {t!r}: bad placeholder ({exc}); use {{label}}, {{description}}") from None
        if not isinstance(text_template, str) or "{text}" not in text_template:
            raise ValueError("text_template must contain {text}")
        self.templates = templates
        self.model = str(model)
        self.temperature = check_float(temperature, "temperature", 0.0, 100.0, lo_open=True)
        self.text_template = text_template
        self.samples = check_positive_int(samples, "samples", 0)
        self.seed = int(seed)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.max_length = check_positive_int(max_length, "max_length", 8)
        self.device = str(device)
        self._class_cache: dict[tuple, np.ndarray] = {}

    def _identity(self) -> dict[str, Any]:
        return {
            "model": model_fingerprint(self.model),
            "templates": self.templates,
            "text_template": self.text_template,
            "temperature": self.temperature,
            "max_length": self.max_length,
            "seed": self.seed,
        }

    def class_prompts(self, class_names: Sequence[str], descriptions: dict[str, str]) -> list[list[str]]:
        """The prompts embedded for each class (one per template)."""
        out = []
        for c in class_names:
            desc = descriptions.get(c) or c
            out.append([t.format(label=c, description=desc) for t in self.templates])
        return out

    def class_embeddings(self, class_names: Sequence[str], descriptions: dict[str, str]) -> np.ndarray:
        key = (tuple(class_names), tuple(sorted(descriptions.items())))
        if key not in self._class_cache:
            prompts = self.class_prompts(class_names, descriptions)
            flat = [p for ps in prompts for p in ps]
            emb, _ = embed(flat, self.model, max_length=self.max_length, device=self.device,
                           batch_size=self.batch_size)
            emb = emb.astype(np.float64).reshape(len(class_names), len(self.templates), -1).mean(axis=1)
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            self._class_cache[key] = emb
        return self._class_cache[key]

    def _annotate(self, texts: list[str], class_names: list[str], descriptions: dict[str, str]) -> AnnotatorResult:
        try:
            return self._annotate_embedded(texts, class_names, descriptions)
        except EncoderError as exc:
            raise AnnotatorError(str(exc)) from exc
        except EmbeddingDeadline as exc:
            raise DeadlineReached(str(exc)) from exc

    def _annotate_embedded(self, texts: list[str], class_names: list[str], descriptions: dict[str, str]) -> AnnotatorResult:
        cls = self.class_embeddings(class_names, descriptions)
        emb, n_tok = self._embed_shared(texts)
        probs = softmax(emb.astype(np.float64) @ cls.T / self.temperature, axis=1)
        cons = None
        if self.samples > 0:
            wrapped = [self.text_template.format(text=t) for t in texts]
            votes = np.zeros_like(probs)
            for s in range(self.samples):
                e, t = dropout_embeddings(wrapped, self.model, seed=self.seed + s, max_length=self.max_length,
                                          device=self.device, batch_size=self.batch_size)
                n_tok += t
                votes[np.arange(len(texts)), (e.astype(np.float64) @ cls.T).argmax(axis=1)] += 1
            cons = votes / self.samples
        return AnnotatorResult(probs=probs, consistency=cons, tokens=n_tok)

    def _embed_shared(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """Unit embeddings of the wrapped ``texts`` through :func:`molal.embeddings.embed` (each text embedded once
        per encoder and max length: by this annotator, another one, the student or MoLAM's text model)."""
        wrapped = [self.text_template.format(text=t) for t in texts]
        return embed(wrapped, self.model, max_length=self.max_length, device=self.device,
                     batch_size=self.batch_size, deadline=current_deadline())

    def prefetch(self, texts: list[str]) -> int:
        """Embed ``texts`` ahead of the calls that will score them (the Mixture hands over several batches at
        once, so they are encoded sorted by length); returns the tokens encoded. Under the caller's deadline; a
        failure is left to the scoring call to report."""
        try:
            return self._embed_shared(texts)[1]
        except EncoderError:
            return 0
        except EmbeddingDeadline as exc:
            raise DeadlineReached(str(exc)) from exc

    def close(self) -> None:
        self._class_cache.clear()


#: The offline default mixture's prompt variants: (name, templates).
DEFAULT_VARIANTS: list[tuple[str, list[str]]] = [
    ("emb-label", ["{label}"]),
    ("emb-about", ["This text is about {label}."]),
    ("emb-question", ["This question is about {label}.", "The answer to this question is a {label}."]),
    ("emb-category", ["Category: {label}.", "A text of the category {label}."]),
    ("emb-desc", ["{description}"]),
]
