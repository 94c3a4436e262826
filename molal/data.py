"""Data model: text datasets (JSONL) and :class:`LLMOutputs`, the per-LLM class probabilities of a pool.

A dataset is JSON Lines with a text field and, optionally, a label field (the class *name*). The class
list is explicit and ordered: class index ``k`` always means ``class_names[k]``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from molal.io import atomic_write_bytes

FORMAT_VERSION = 1


class DataError(ValueError):
    """Bad input data; the message names the file, line and field where possible."""


# --------------------------------------------------------------------------------------------------
# Text datasets
# --------------------------------------------------------------------------------------------------


@dataclass
class TextDataset:
    """Texts with optional gold labels (class indices, -1 = unlabeled) over an ordered class list."""

    texts: list[str]
    class_names: list[str]
    labels: np.ndarray | None = None  # int64 (n,), -1 where unknown
    extra: list[dict[str, Any]] = field(default_factory=list)
    source: str | None = None

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None and bool((self.labels >= 0).any())


def _iter_jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    if not Path(path).is_file():
        raise DataError(f"{path}: not a file" if Path(path).exists() else f"{path}: file not found")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def load_dataset(
    path: str | os.PathLike[str],
    class_names: Sequence[str] | None = None,
    text_field: str = "text",
    label_field: str = "label",
    require_labels: bool = False,
) -> TextDataset:
    """Read a JSONL dataset.

    ``class_names`` fixes the class order; labels not in it are an error. Without it, the classes are the
    sorted set of labels seen (so pass it whenever the order matters). Empty texts are an error.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file not found")
    texts: list[str] = []
    raw_labels: list[str | None] = []
    extra: list[dict[str, Any]] = []
    linenos: list[int] = []
    for lineno, obj in _iter_jsonl(p):
        linenos.append(lineno)
        if text_field not in obj:
            raise DataError(f"{p}:{lineno}: missing field {text_field!r}")
        text = obj[text_field]
        if not isinstance(text, str):
            raise DataError(f"{p}:{lineno}: field {text_field!r} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError(f"{p}:{lineno}: field {text_field!r} is empty")
        lab = obj.get(label_field)
        if lab is not None and not isinstance(lab, str):
            lab = str(lab)
        if require_labels and lab is None:
            raise DataError(f"{p}:{lineno}: missing field {label_field!r}")
        texts.append(text)
        raw_labels.append(lab)
        extra.append({k: v for k, v in obj.items() if k not in (text_field, label_field)})
    if not texts:
        raise DataError(f"{p}: no rows")
    if class_names is None:
        class_names = sorted({lab for lab in raw_labels if lab is not None})
        if not class_names:
            raise DataError(f"{p}: no labels found and no class list given (pass class_names / --labels)")
    class_names = list(class_names)
    index = {c: i for i, c in enumerate(class_names)}
    labels = np.full(len(texts), -1, dtype=np.int64)
    any_label = False
    for i, lab in enumerate(raw_labels):
        if lab is None:
            continue
        if lab not in index:
            raise DataError(
                f"{p}:{linenos[i]}: field {label_field!r} = {lab!r} is not one of the classes {class_names}"
            )
        labels[i] = index[lab]
        any_label = True
    return TextDataset(texts=texts, class_names=class_names, labels=labels if any_label else None, extra=extra, source=str(p))


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> Path:
    """Write rows as JSON Lines atomically."""
    buf = io.StringIO()
    for row in rows:
        buf.write(json.dumps(row, ensure_ascii=False))
        buf.write("\n")
    return atomic_write_bytes(path, buf.getvalue().encode("utf-8"), mode=0o644)


# --------------------------------------------------------------------------------------------------
# LLM outputs
# --------------------------------------------------------------------------------------------------


class LLMOutputs:
    """What a mixture of LLMs said about a pool of n texts over K classes.

    Attributes:
        probs: float (n, L, K) — each LLM's probability for each class (recorded values may not sum to 1;
            see :meth:`normalized_probs`).
        consistency: float (n, L, K) or None — fraction of T sampled answers equal to each class.
        class_names: the K class names, in index order.
        llm_names: the L annotator names, in index order.
        texts: optional list of the n texts.
    """

    def __init__(
        self,
        probs: np.ndarray,
        consistency: np.ndarray | None = None,
        class_names: Sequence[str] = (),
        llm_names: Sequence[str] = (),
        texts: Sequence[str] | None = None,
    ) -> None:
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim != 3:
            raise ValueError(f"probs must have shape (n, L, K), got {probs.shape}")
        n, n_llm, k = probs.shape
        class_names = [str(c) for c in class_names] if len(class_names) else [f"class_{i}" for i in range(k)]
        llm_names = [str(c) for c in llm_names] if len(llm_names) else [f"llm_{i}" for i in range(n_llm)]
        if len(class_names) != k:
            raise ValueError(f"{len(class_names)} class names for {k} classes in probs")
        if len(llm_names) != n_llm:
            raise ValueError(f"{len(llm_names)} LLM names for {n_llm} LLMs in probs")
        if len(set(class_names)) != k:
            raise ValueError(f"duplicate class names: {class_names}")
        if not np.isfinite(probs).all() or (probs < 0).any():
            raise ValueError("probs must be finite and non-negative")
        if consistency is not None:
            consistency = np.asarray(consistency, dtype=np.float64)
            if consistency.shape != probs.shape:
                raise ValueError(f"consistency shape {consistency.shape} != probs shape {probs.shape}")
            if not np.isfinite(consistency).all() or (consistency < 0).any() or (consistency > 1 + 1e-9).any():
                raise ValueError("consistency must be fractions in [0, 1]")
        if texts is not None:
            texts = [str(t) for t in texts]
            if len(texts) != n:
                raise ValueError(f"{len(texts)} texts for {n} rows")
        self.probs = probs
        self.consistency = consistency
        self.class_names = list(class_names)
        self.llm_names = list(llm_names)
        self.texts = texts

    # -- shape helpers -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return self.probs.shape  # type: ignore[return-value]

    @property
    def n_items(self) -> int:
        return self.probs.shape[0]

    @property
    def n_llms(self) -> int:
        return self.probs.shape[1]

    @property
    def n_classes(self) -> int:
        return self.probs.shape[2]

    def __len__(self) -> int:
        return self.n_items

    def __repr__(self) -> str:
        return (
            f"LLMOutputs(n={self.n_items}, llms={self.llm_names}, classes={self.class_names}, "
            f"consistency={'yes' if self.consistency is not None else 'no'})"
        )

    def normalized_probs(self, eps: float = 1e-12) -> np.ndarray:
        """probs renormalised to sum to 1 per (item, LLM); an all-zero row becomes uniform."""
        s = self.probs.sum(axis=2, keepdims=True)
        out = np.where(s > eps, self.probs / np.maximum(s, eps), 1.0 / self.n_classes)
        return out

    def subset(self, idx: Sequence[int] | np.ndarray) -> LLMOutputs:
        """Rows ``idx`` as a new LLMOutputs."""
        idx = np.asarray(idx, dtype=np.int64)
        return LLMOutputs(
            probs=self.probs[idx],
            consistency=None if self.consistency is None else self.consistency[idx],
            class_names=self.class_names,
            llm_names=self.llm_names,
            texts=None if self.texts is None else [self.texts[i] for i in idx],
        )

    def select_llms(self, names: Sequence[str]) -> LLMOutputs:
        """Only the LLMs named (in that order)."""
        try:
            cols = [self.llm_names.index(n) for n in names]
        except ValueError as exc:
            raise ValueError(f"unknown LLM in {list(names)}; have {self.llm_names}") from exc
        return LLMOutputs(
            probs=self.probs[:, cols],
            consistency=None if self.consistency is None else self.consistency[:, cols],
            class_names=self.class_names,
            llm_names=[self.llm_names[c] for c in cols],
            texts=self.texts,
        )

    @staticmethod
    def concat_llms(parts: Sequence[LLMOutputs]) -> LLMOutputs:
        """Stack several LLMOutputs over the same rows and classes along the LLM axis."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        for p in parts[1:]:
            if p.class_names != first.class_names or p.n_items != first.n_items:
                raise ValueError("LLMOutputs to concatenate must share rows and class names")
        cons = None
        if all(p.consistency is not None for p in parts):
            cons = np.concatenate([p.consistency for p in parts], axis=1)  # type: ignore[misc]
        elif any(p.consistency is not None for p in parts):
            # annotators that did not sample contribute their argmax as a one-hot "consistency"
            cons = np.concatenate(
                [p.consistency if p.consistency is not None else _onehot_argmax(p.probs) for p in parts], axis=1
            )
        return LLMOutputs(
            probs=np.concatenate([p.probs for p in parts], axis=1),
            consistency=cons,
            class_names=first.class_names,
            llm_names=[n for p in parts for n in p.llm_names],
            texts=first.texts,
        )

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save to one ``.npz`` file (atomically)."""
        meta = {
            "format": "molal.LLMOutputs",
            "format_version": FORMAT_VERSION,
            "class_names": self.class_names,
            "llm_names": self.llm_names,
        }
        arrays: dict[str, Any] = {"probs": self.probs, "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
        if self.consistency is not None:
            arrays["consistency"] = self.consistency
        if self.texts is not None:
            arrays["texts"] = np.array(self.texts, dtype=np.str_)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return atomic_write_bytes(path, buf.getvalue(), mode=0o644)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LLMOutputs:
        p = Path(path)
        if not p.exists():
            raise DataError(f"{p}: file not found")
        try:
            with np.load(p, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if meta.get("format") != "molal.LLMOutputs":
                    raise DataError(f"{p}: not a molal LLMOutputs file")
                if int(meta.get("format_version", 0)) > FORMAT_VERSION:
                    raise DataError(f"{p}: format version {meta['format_version']} is newer than this molal")
                return cls(
                    probs=z["probs"],
                    consistency=z["consistency"] if "consistency" in z.files else None,
                    class_names=meta["class_names"],
                    llm_names=meta["llm_names"],
                    texts=[str(t) for t in z["texts"]] if "texts" in z.files else None,
                )
        except (OSError, KeyError, ValueError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"{p}: cannot read LLM outputs ({exc})") from exc

    # -- the recorded format of shared/data/llm-outputs ------------------------------------------------
    @classmethod
    def from_recorded_jsonl(
        cls,
        paths: Sequence[str | os.PathLike[str]],
        class_names: Sequence[str],
        llm_names: Sequence[str] | None = None,
    ) -> LLMOutputs:
        """Read recorded LLM outputs: one JSONL file per LLM with ``llm_logits`` (K floats, the recorded
        class probabilities) and ``llm_label`` (T sampled answers). Rows must align across files (same
        texts in the same order). Consistency = fraction of the T answers equal (case-insensitively,
        stripped) to each class name. LLM names default to the file stems.
        """
        if not paths:
            raise DataError("no recorded files given")
        class_names = list(class_names)
        k = len(class_names)
        lower = {c.lower(): i for i, c in enumerate(class_names)}
        all_probs, all_cons = [], []
        texts: list[str] | None = None
        for path in paths:
            p = Path(path)
            if not p.exists():
                raise DataError(f"{p}: file not found")
            probs_rows, cons_rows, file_texts = [], [], []
            for lineno, obj in _iter_jsonl(p):
                logits = obj.get("llm_logits")
                if not isinstance(logits, list) or len(logits) != k:
                    raise DataError(f"{p}:{lineno}: field 'llm_logits' must be a list of {k} numbers")
                try:
                    row = [float(x) for x in logits]
                except (TypeError, ValueError):
                    raise DataError(f"{p}:{lineno}: field 'llm_logits' must hold numbers") from None
                if not all(np.isfinite(x) and x >= 0 for x in row):
                    raise DataError(f"{p}:{lineno}: field 'llm_logits' must hold finite non-negative numbers")
                answers = obj.get("llm_label", [])
                if not isinstance(answers, list):
                    raise DataError(f"{p}:{lineno}: field 'llm_label' must be a list of strings")
                votes = np.zeros(k)
                for a in answers:
                    j = lower.get(str(a).strip().lower())
                    if j is not None:
                        votes[j] += 1
                probs_rows.append(row)
                cons_rows.append(votes / max(len(answers), 1))
                file_texts.append(str(obj.get("text", "")))
            if texts is None:
                texts = file_texts
            elif len(file_texts) != len(texts) or file_texts != texts:
                raise DataError(f"{p}: rows do not align with {paths[0]} (different count or texts)")
            all_probs.append(np.asarray(probs_rows))
            all_cons.append(np.asarray(cons_rows))
        names = list(llm_names) if llm_names is not None else [Path(p).stem for p in paths]
        return cls(
            probs=np.stack(all_probs, axis=1),
            consistency=np.stack(all_cons, axis=1),
            class_names=class_names,
            llm_names=names,
            texts=texts,
        )


def _onehot_argmax(probs: np.ndarray) -> np.ndarray:
    out = np.zeros_like(probs)
    idx = probs.argmax(axis=2)
    np.put_along_axis(out, idx[..., None], 1.0, axis=2)
    return out
