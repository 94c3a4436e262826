"""The annotator face: one LLM (or scorer) with one prompt template and decoding parameters.

An :class:`Annotator` turns texts + an ordered class list (+ optional label descriptions) into an
:class:`AnnotatorResult`: per-class probabilities (rows sum to 1) and, when the annotator samples
(``samples > 0``), self-consistency (fraction of the T sampled answers equal to each class). Rows that
could not be annotated are listed in ``failed`` (row -> reason) and hold NaN, so that nobody uses or
caches them by accident.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class AnnotatorError(RuntimeError):
    """An annotator could not run at all (model missing, server unreachable, bad response...)."""


class AnnotatorUnavailable(AnnotatorError):
    """The backend cannot be reached (after retries): every further call would fail the same way."""


class DeadlineReached(AnnotatorError):
    """The caller's deadline passed during a call: the rows are not failed, just not done (pending)."""


_DEADLINE: ContextVar[float | None] = ContextVar("molal_annotate_deadline", default=None)


def current_deadline() -> float | None:
    """The ``time.monotonic()`` deadline of the annotate call in progress (set by the Mixture), or None."""
    return _DEADLINE.get()


@contextmanager
def deadline_scope(deadline: float | None) -> Iterator[None]:
    """Run annotator calls under ``deadline``: remote annotators cap their timeouts/retries by it."""
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


class ConfigError(ValueError):
    """A bad annotator or mixture specification; the message names the file and the field."""


@dataclass
class AnnotatorResult:
    """What one annotator said about n texts over K classes.

    probs: (n, K) float64, each done row a distribution (sums to 1); failed rows are NaN.
    consistency: (n, K) fraction of the T sampled answers equal to each class (rows sum to <= 1: answers
    that match no class count for none), or None when the annotator does not sample.
    failed: row -> reason for rows that could not be annotated.
    tokens: number of tokens the model processed (prompt + generated) when known, else None.
    """

    probs: np.ndarray
    consistency: np.ndarray | None = None
    failed: dict[int, str] = field(default_factory=dict)
    tokens: int | None = None

    @property
    def ok_rows(self) -> np.ndarray:
        return np.array([i for i in range(self.probs.shape[0]) if i not in self.failed], dtype=np.int64)


def validate_classes(class_names: Sequence[str], descriptions: Mapping[str, str] | None = None) -> list[str]:
    """Check the class list (non-empty, unique, non-blank strings) and that descriptions name known classes."""
    if isinstance(class_names, str):
        raise ValueError("class_names must be a list of class names, not one string")
    names = list(class_names)
    if not names:
        raise ValueError("class_names is empty: give at least one class")
    for i, c in enumerate(names):
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"class_names[{i}] = {c!r} is not a non-empty string")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise ValueError(f"duplicate class names: {dup}")
    if descriptions:
        unknown = [k for k in descriptions if k not in names]
        if unknown:
            raise ValueError(f"descriptions name unknown classes {unknown}; classes are {names}")
    return names


def validate_texts(texts: Sequence[str]) -> dict[int, str]:
    """Rows that cannot be annotated (non-strings, blank texts) -> reason."""
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, not one string")
    bad: dict[int, str] = {}
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            bad[i] = f"text is not a string ({type(t).__name__})"
        elif not t.strip():
            bad[i] = "empty text"
    return bad


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / e.sum(axis=axis, keepdims=True)


_PUNCT = " \t\r\n\"'`.,;:!?()[]{}*_<>"


def normalize_answer(answer: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding quotes/punctuation/markdown."""
    a = " ".join(str(answer).split()).lower()
    return a.strip(_PUNCT)


def match_answer(answer: str, class_names: Sequence[str], verbalizers: Sequence[str] | None = None) -> int | None:
    """The class a sampled answer names, or None.

    Exact match (after :func:`normalize_answer`) of the class name or its verbalizer first; otherwise the
    answer's first line must *start* with exactly one class name / verbalizer followed by a word boundary
    (e.g. "human. The question asks for a person" -> human). Anything else matches no class.
    """
    forms: list[tuple[str, int]] = []
    for k, c in enumerate(class_names):
        forms.append((normalize_answer(c), k))
        if verbalizers is not None:
            forms.append((normalize_answer(verbalizers[k]), k))
    a = normalize_answer(answer)
    for f, k in forms:
        if a == f:
            return k
    first = normalize_answer(a.split("\n", 1)[0]) if a else ""
    hits = {k for f, k in forms if f and re.match(re.escape(f) + r"(\b|$)", first)}
    if len(hits) == 1:
        return hits.pop()
    return None


def consistency_from_answers(
    answers: Sequence[str], class_names: Sequence[str], verbalizers: Sequence[str] | None = None
) -> np.ndarray:
    """Fraction of the answers equal to each class (answers matching no class count for none)."""
    k = len(class_names)
    out = np.zeros(k, dtype=np.float64)
    if not answers:
        return out
    for a in answers:
        j = match_answer(a, class_names, verbalizers)
        if j is not None:
            out[j] += 1
    return out / len(answers)


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


#: the calibrations an LLM annotator may apply (``calibrate = ...``)
CALIBRATIONS = ("content_free",)
#: inputs without content whose predicted distribution is the model's bias (Zhao et al., 2021, "Calibrate
#: before use"); "" is not an allowed text, so a lone dash stands in for the empty input
CONTENT_FREE_TEXTS = ("N/A", "[MASK]", "-")


def check_calibrate(value: Any) -> str | None:
    """``calibrate``: None (off) or ``"content_free"`` (divide by the classes' probabilities on content-free
    inputs, then renormalise: removes a model's prior for some label words)."""
    if value is None or value in CALIBRATIONS:
        return value
    raise ValueError(f"calibrate must be one of {list(CALIBRATIONS)} or omitted, got {value!r}")


class Annotator:
    """Base class. Subclasses set ``name``/``samples`` and implement :meth:`_annotate` and :meth:`_identity`.

    ``batch_size`` is how many texts the mixture hands over per call (and per cache transaction).
    ``calibrate = "content_free"`` (LLM annotators) divides each row by the mean distribution the model gives
    :data:`CONTENT_FREE_TEXTS` under the same prompt and classes (computed once per class list), then
    renormalises; a prompt with few-shot examples from the seeds is calibrated on the project's other labelled
    texts instead (:meth:`calibration_texts`), where content-free inputs misjudge the bias.
    """

    type: str = "base"
    #: what a subclass builds at run time (a loaded model, an open client, a lock) and how to start again:
    #: ``{attribute: factory}``. Such attributes are not pickled: a copy sent to another process (a
    #: distributed engine's workers, :mod:`molal.annotators.engine`) builds them again on first use there.
    _runtime: dict[str, Any] = {}
    #: what the member is, as reviewers see it in its predictions' model version ``<kind>:<name>``:
    #: ``"llm"`` for language models (live or recorded), ``"scorer"`` for embedding similarity scorers
    kind: str = "llm"
    name: str
    samples: int = 0
    batch_size: int = 16
    calibrate: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._runtime}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for k, factory in self._runtime.items():
            setattr(self, k, factory())

    def identity(self) -> dict[str, Any]:
        """Everything that changes this annotator's answers (backend, model, prompt, params): the cache key."""
        ident = {"type": self.type, **self._identity()}
        ident["samples"] = int(self.samples)
        if self.calibrate:  # only then: uncalibrated annotators keep their cache identity
            ident["calibrate"] = self.calibrate
            texts = self.calibration_texts()
            if texts is not CONTENT_FREE_TEXTS:  # measured on the project's texts: they change the answers
                ident["calibrated_on"] = stable_hash(list(texts))
        return ident

    def calibration_texts(self) -> Sequence[str]:
        """The inputs whose mean answer is the model's bias for ``calibrate``: the prompt's
        :attr:`~molal.annotators.prompts.Prompt.calibration_texts` (labelled texts of the project beside its
        few-shot examples from the seeds) where it has them, else :data:`CONTENT_FREE_TEXTS`."""
        texts = getattr(getattr(self, "prompt", None), "calibration_texts", None)
        return list(texts) if texts else CONTENT_FREE_TEXTS

    def content_free_probs(self, class_names: list[str], descriptions: dict[str, str]) -> np.ndarray:
        """The model's mean distribution over the classes for content-free inputs (cached per class list)."""
        memo = self.__dict__.setdefault("_content_free", {})
        # keyed by the identity too: a copy with other few-shot examples shares this dict, not the bias
        key = (stable_hash(self.identity()), tuple(class_names), tuple(sorted(descriptions.items())))
        if key not in memo:
            texts = list(self.calibration_texts())
            res = self._annotate(texts, class_names, descriptions)
            ok = [i for i in range(len(texts)) if i not in res.failed and np.isfinite(res.probs[i]).all()]
            if not ok:
                what = "the content-free inputs" if texts == list(CONTENT_FREE_TEXTS) else "the calibration texts"
                raise AnnotatorError(f"annotator {self.name!r}: calibration failed: no answer for {what} "
                                     f"({'; '.join(sorted(set(res.failed.values()))) or 'no probabilities'})")
            p = res.probs[ok].mean(axis=0)
            memo[key] = np.maximum(p / p.sum(), 1e-6)
        return memo[key]

    def _calibrated(self, res: AnnotatorResult, class_names: list[str], descriptions: dict[str, str]) -> AnnotatorResult:
        if not self.calibrate:
            return res
        cf = self.content_free_probs(class_names, descriptions)
        with np.errstate(invalid="ignore"):
            q = res.probs / cf[None, :]
            q = q / q.sum(axis=1, keepdims=True)
        return AnnotatorResult(probs=q, consistency=res.consistency, failed=res.failed, tokens=res.tokens)

    def _identity(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def annotate(
        self, texts: Sequence[str], class_names: Sequence[str], descriptions: Mapping[str, str] | None = None
    ) -> AnnotatorResult:
        """Probabilities (and consistency when ``samples > 0``) for each text. Raises ValueError on a bad
        class list; blank texts become failed rows; :class:`AnnotatorError` when the backend cannot run."""
        names = validate_classes(class_names, descriptions)
        texts = list(texts)
        n, k = len(texts), len(names)
        bad = validate_texts(texts)
        good = [i for i in range(n) if i not in bad]
        probs = np.full((n, k), np.nan)
        cons = np.full((n, k), np.nan) if self.samples > 0 else None
        failed = dict(bad)
        tokens = None
        if good:
            try:
                res = self._annotate([texts[i] for i in good], names, dict(descriptions or {}))
                res = self._calibrated(res, names, dict(descriptions or {}))
            except AnnotatorError as exc:
                part = getattr(exc, "partial", None)  # rows finished before the backend failed
                exc.partial = None
                if isinstance(part, AnnotatorResult) and len(good) == len(part.probs):
                    try:  # calibrated like any other row, or not kept at all
                        exc.partial = self._assemble(n, k, good, dict(bad), self._calibrated(part, names, dict(descriptions or {})))
                    except AnnotatorError:
                        pass
                raise
            return self._assemble(n, k, good, dict(bad), res)
        return AnnotatorResult(probs=probs, consistency=cons, failed=failed, tokens=tokens)

    def _assemble(self, n: int, k: int, good: list[int], failed: dict[int, str], res: AnnotatorResult) -> AnnotatorResult:
        probs = np.full((n, k), np.nan)
        cons = np.full((n, k), np.nan) if self.samples > 0 else None
        tokens = None
        if good:
            tokens = res.tokens
            for j, i in enumerate(good):
                if j in res.failed:
                    failed[i] = res.failed[j]
                    continue
                row = res.probs[j]
                if not np.all(np.isfinite(row)) or row.sum() <= 0:
                    failed[i] = "annotator returned no usable probabilities"
                    continue
                probs[i] = row / row.sum()
                if cons is not None:
                    if res.consistency is None:
                        raise AnnotatorError(f"annotator {self.name!r} did not return consistency (samples={self.samples})")
                    cons[i] = res.consistency[j]
        return AnnotatorResult(probs=probs, consistency=cons, failed=failed, tokens=tokens)

    def _annotate(self, texts: list[str], class_names: list[str], descriptions: dict[str, str]) -> AnnotatorResult:
        raise NotImplementedError  # pragma: no cover - abstract

    def close(self) -> None:
        """Free resources (models, connections). The annotator may be used again afterwards (reloads)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    return name


def check_positive_int(value: Any, field_name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field_name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_float(value: Any, field_name: str, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field_name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v <= lo):
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{field_name} must be in {rng}, got {value!r}")
    return v
