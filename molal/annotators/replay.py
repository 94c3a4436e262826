"""Replay annotator: serves recorded LLM outputs by exact text (whitespace-normalised).

Sources: ``"bundled:trec"`` (``molal/assets/trec_recorded.npz``), any LLMOutputs ``.npz`` with texts, or a
recorded JSONL file (one LLM per file, the format of ``shared/data/llm-outputs``). Texts that are not in
the recording are reported as failed rows ("text not in the recording"), never filled with a guess.
Recorded probabilities that do not sum to 1 (the MoLLIA substring sums) are renormalised; an all-zero
recorded row is reported as failed.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import numpy as np

from molal.annotators.base import Annotator, AnnotatorError, AnnotatorResult, check_name

_SOURCES: dict[tuple[str, tuple[str, ...] | None], Any] = {}
_LOCK = threading.Lock()


def norm_text(text: str) -> str:
    """Whitespace-normalised text used as the replay lookup key."""
    return " ".join(text.split())


def resolve_source(source: str) -> Path:
    if source.startswith("bundled:"):
        from molal.resources import asset_path

        name = source.split(":", 1)[1]
        try:
            return asset_path(f"{name}_recorded.npz")
        except FileNotFoundError:
            raise AnnotatorError(f"no bundled recording named {name!r} (have: bundled:trec)") from None
    p = Path(source).expanduser()
    if not p.exists():
        raise AnnotatorError(f"recording {p} not found")
    return p


class _Recording:
    def __init__(self, path: Path, class_names: list[str] | None) -> None:
        from molal.data import DataError, LLMOutputs

        self.path = path
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        try:
            if path.suffix == ".npz":
                out = LLMOutputs.load(path)
            else:
                if class_names is None:
                    raise AnnotatorError(f"{path}: a recorded JSONL needs the class list (field 'classes')")
                out = LLMOutputs.from_recorded_jsonl([path], class_names)
        except DataError as exc:
            raise AnnotatorError(str(exc)) from exc
        if out.texts is None:
            raise AnnotatorError(f"{path}: the recording has no texts, so it cannot be replayed")
        self.outputs = out
        self.index: dict[str, int] = {}
        for i, t in enumerate(out.texts):
            self.index.setdefault(norm_text(t), i)

    def covers(self, texts: list[str]) -> float:
        if not texts:
            return 0.0
        return sum(norm_text(t) in self.index for t in texts) / len(texts)


def load_recording(source: str, class_names: list[str] | None = None) -> _Recording:
    path = resolve_source(source)
    key = (str(path.resolve()), tuple(class_names) if class_names and path.suffix != ".npz" else None)
    with _LOCK:
        if key not in _SOURCES:
            _SOURCES[key] = _Recording(path, class_names)
        return _SOURCES[key]


class ReplayAnnotator(Annotator):
    """One recorded LLM.

    Args:
        name: display name (default: the recorded LLM's name).
        source: ``"bundled:trec"``, an LLMOutputs ``.npz`` or a recorded ``.jsonl``.
        llm: which recorded LLM of an ``.npz`` (default: ``name``; may be omitted for a single-LLM file).
        classes: the recorded class list (needed for a JSONL recording).
        samples: ignored except for bookkeeping; consistency is served when the recording has it.
    """

    type = "replay"

    def __init__(
        self,
        name: str,
        source: str = "bundled:trec",
        llm: str | None = None,
        classes: list[str] | None = None,
        batch_size: int = 512,
    ) -> None:
        self.name = check_name(name)
        if not isinstance(source, str) or not source:
            raise ValueError("source must be 'bundled:<name>' or a path to a recording")
        self.source = source
        self.classes = list(classes) if classes is not None else None
        rec = load_recording(source, self.classes)
        names = rec.outputs.llm_names
        want = llm or (name if name in names else (names[0] if len(names) == 1 else None))
        if want not in names:
            raise ValueError(f"llm {want or name!r} is not in the recording {rec.path} (it has {names})")
        self.llm = want
        self._col = names.index(want)
        self._rec = rec
        self.batch_size = batch_size
        self.samples = 1 if rec.outputs.consistency is not None else 0

    @property
    def recorded_classes(self) -> list[str]:
        return list(self._rec.outputs.class_names)

    def covers(self, texts: list[str]) -> float:
        """Fraction of ``texts`` found in the recording."""
        return self._rec.covers(texts)

    def _identity(self) -> dict[str, Any]:
        return {"source_sha256": self._rec.sha256, "llm": self.llm, "classes": self.recorded_classes}

    def _annotate(self, texts: list[str], class_names: list[str], descriptions: dict[str, str]) -> AnnotatorResult:
        rec_classes = self.recorded_classes
        missing = [c for c in class_names if c not in rec_classes]
        if missing or len(class_names) != len(rec_classes):
            raise ValueError(
                f"replay annotator {self.name!r}: classes {class_names} do not match the recorded classes {rec_classes}"
                + (f" (unknown: {missing})" if missing else "")
            )
        order = [rec_classes.index(c) for c in class_names]
        out = self._rec.outputs
        n, k = len(texts), len(class_names)
        probs = np.full((n, k), np.nan)
        cons = np.full((n, k), np.nan) if out.consistency is not None else None
        failed: dict[int, str] = {}
        for i, t in enumerate(texts):
            r = self._rec.index.get(norm_text(t))
            if r is None:
                failed[i] = f"text not in the recording {self._rec.path.name}"
                continue
            row = out.probs[r, self._col, order]
            if row.sum() <= 0:
                failed[i] = "the recorded probabilities are all zero"
                continue
            probs[i] = row / row.sum()
            if cons is not None:
                cons[i] = out.consistency[r, self._col, order]  # type: ignore[index]
        return AnnotatorResult(probs=probs, consistency=cons, failed=failed, tokens=None)
