"""Embedding zero-shot scorer: cosine similarity between a text and its class prompts, softmaxed.

The text and each class prompt (one or several templates, e.g. ``"This text is about {label}."``,
``"{label}"``, ``"{description}"``) are embedded with a sentence encoder (mean pooling over tokens,
L2-normalised; the bundled all-MiniLM-L6-v2 by default, loaded offline). A class's embedding is the
normalised mean of its template embeddings; ``probs = softmax(cos(text, class) / temperature)``.

Self-consistency (``samples > 0``): T stochastic forward passes of the text with the encoder's dropout on
(MC dropout, seeded), each "answers" the argmax class; consistency is the fraction of passes per class.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from molal.annotators.base import (
    Annotator,
    AnnotatorError,
    AnnotatorResult,
    check_float,
    check_name,
    check_positive_int,
    softmax,
)

DEFAULT_TEMPLATES = ["This text is about {label}."]
_MODELS: dict[tuple[str, str], Any] = {}
_MODELS_LOCK = threading.Lock()
#: text embeddings shared by the annotators of one process (the default mixture's variants embed the same
#: texts with the same encoder): (model, max_length, text) -> unit vector, LRU-bounded.
_TEXT_EMB: OrderedDict[tuple[str, int, str], np.ndarray] = OrderedDict()
_TEXT_EMB_MAX = 50_000
_TEXT_EMB_LOCK = threading.Lock()


def _resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_encoder(model: str = "minilm", device: str = "cpu") -> tuple[Any, Any]:
    """(tokenizer, model) of a sentence encoder from a local folder (``"minilm"`` = bundled), cached."""
    from molal.resources import offline_env, resolve_model_path

    path = resolve_model_path(model)
    key = (path, device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            offline_env()
            try:
                from transformers import AutoModel, AutoTokenizer

                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
                mdl = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
            except (OSError, ValueError) as exc:
                raise AnnotatorError(f"cannot load the encoder {model!r} from {path}: {exc}") from exc
            _MODELS[key] = (tok, mdl)
        return _MODELS[key]


def _model_fingerprint(model: str) -> dict[str, Any]:
    """Install-independent identity of an encoder: its name and the sizes of its weight/config files (so a
    cache survives moving the venv, but not swapping the weights)."""
    from pathlib import Path

    from molal.resources import resolve_model_path

    path = Path(resolve_model_path(model))
    files = {}
    if path.is_dir():
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + [path / "config.json", path / "tokenizer.json"]:
            if f.exists():
                files[f.name] = f.stat().st_size
    name = "all-MiniLM-L6-v2" if str(path) == resolve_model_path("minilm") else model
    return {"name": name, "files": files}


def embed_texts(
    texts: Sequence[str],
    model: str = "minilm",
    device: str = "cpu",
    batch_size: int = 64,
    max_length: int = 128,
    dropout_seed: int | None = None,
) -> tuple[np.ndarray, int]:
    """Mean-pooled, L2-normalised embeddings (n, d) and the number of tokens processed.

    With ``dropout_seed`` the encoder runs with dropout on (one stochastic pass, seeded)."""
    import torch

    tok, mdl = load_encoder(model, device)
    out, n_tokens = [], 0
    gen_state = None
    if dropout_seed is not None:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(dropout_seed)
        mdl.train()
    try:
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                enc = tok(list(texts[s : s + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                enc = {k: v.to(device) for k, v in enc.items()}
                hidden = mdl(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out.append(pooled.float().cpu().numpy())
                n_tokens += int(enc["attention_mask"].sum())
    finally:
        if dropout_seed is not None:
            mdl.eval()
            torch.random.set_rng_state(gen_state)
    return np.concatenate(out, axis=0).astype(np.float64), n_tokens


def embed_texts_shared(
    texts: Sequence[str], model: str = "minilm", device: str = "cpu", batch_size: int = 64, max_length: int = 128
) -> tuple[np.ndarray, int]:
    """:func:`embed_texts` through the process-wide LRU cache keyed by (model, max_length, text): the
    annotators of one mixture, and MoLAM's text model, embed each text once per process. Returns the (n, d)
    embeddings and the number of tokens actually processed (0 when everything was cached)."""
    device = _resolve_device(device)
    keys = [(model, int(max_length), t) for t in texts]
    with _TEXT_EMB_LOCK:
        found = {i: _TEXT_EMB[k] for i, k in enumerate(keys) if k in _TEXT_EMB}
    todo = [i for i in range(len(texts)) if i not in found]
    n_tok = 0
    if todo:
        uniq = list(dict.fromkeys(texts[i] for i in todo))
        new, n_tok = embed_texts(uniq, model, device, batch_size, int(max_length))
        by_text = dict(zip(uniq, new, strict=True))
        with _TEXT_EMB_LOCK:
            for t, v in by_text.items():
                _TEXT_EMB[(model, int(max_length), t)] = v
                _TEXT_EMB.move_to_end((model, int(max_length), t))
            while len(_TEXT_EMB) > _TEXT_EMB_MAX:
                _TEXT_EMB.popitem(last=False)
        for i in todo:
            found[i] = by_text[texts[i]]
    if not found:
        return np.zeros((0, 0)), 0
    return np.stack([found[i] for i in range(len(texts))]), n_tok


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
            "model": _model_fingerprint(self.model),
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
            emb, _ = embed_texts(flat, self.model, _resolve_device(self.device), self.batch_size, self.max_length)
            emb = emb.reshape(len(class_names), len(self.templates), -1).mean(axis=1)
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            self._class_cache[key] = emb
        return self._class_cache[key]

    def _annotate(self, texts: list[str], class_names: list[str], descriptions: dict[str, str]) -> AnnotatorResult:
        device = _resolve_device(self.device)
        cls = self.class_embeddings(class_names, descriptions)
        wrapped = [self.text_template.format(text=t) for t in texts]
        emb, n_tok = self._embed_shared(wrapped, device)
        probs = softmax(emb @ cls.T / self.temperature, axis=1)
        cons = None
        if self.samples > 0:
            votes = np.zeros_like(probs)
            for s in range(self.samples):
                e, t = embed_texts(wrapped, self.model, device, self.batch_size, self.max_length, dropout_seed=self.seed + s)
                n_tok += t
                votes[np.arange(len(texts)), (e @ cls.T).argmax(axis=1)] += 1
            cons = votes / self.samples
        return AnnotatorResult(probs=probs, consistency=cons, tokens=n_tok)

    def _embed_shared(self, wrapped: list[str], device: str) -> tuple[np.ndarray, int]:
        """Embeddings of ``wrapped``, reusing those another annotator with the same encoder just computed."""
        return embed_texts_shared(wrapped, self.model, device, self.batch_size, self.max_length)

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
