"""The common face of every aggregator (MoLAM and the baselines): fit / predict_proba / predict / save / load.

Conventions (scikit-learn's): ``__init__`` only stores its parameters (:meth:`Aggregator.get_params` reads
them back from the signature); they are checked when :meth:`Aggregator.fit` runs; what fit learns lives in
attributes ending in ``_`` (plus ``class_names``, ``llm_names`` and ``metadata``, set by every fit). A model
is saved as one JSON file (format ``molal.aggregator``) and loaded by its ``kind``.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from molal import __version__
from molal.data import LLMOutputs
from molal.io import atomic_write_bytes

FORMAT = "molal.aggregator"
FORMAT_VERSION = 1
EPS = 1e-12


class MoLAMError(ValueError):
    """Bad input to an aggregator (labels out of range, mismatched classes, unreadable model file...)."""


def normalize_rows(p: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1 (an all-zero row becomes uniform)."""
    s = p.sum(axis=-1, keepdims=True)
    k = p.shape[-1]
    return np.where(s > EPS, p / np.maximum(s, EPS), 1.0 / k)


def check_fit_inputs(outputs: LLMOutputs, labeled_idx: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """``labeled_idx`` and ``labels`` as int64 arrays, or a MoLAMError saying what is wrong."""
    if not isinstance(outputs, LLMOutputs):
        raise MoLAMError(f"outputs must be an LLMOutputs, got {type(outputs).__name__}")
    idx = np.asarray(labeled_idx)
    lab = np.asarray(labels)
    if idx.ndim != 1 or lab.ndim != 1:
        raise MoLAMError("labeled_idx and labels must be 1-D sequences")
    if len(idx) != len(lab):
        raise MoLAMError(f"{len(idx)} labeled indices but {len(lab)} labels")
    if len(idx) == 0:
        raise MoLAMError("no seed labels: fit needs at least one labeled item (labeled_idx is empty)")
    if not np.issubdtype(idx.dtype, np.integer) or not np.issubdtype(lab.dtype, np.integer):
        raise MoLAMError("labeled_idx and labels must be integers (row indices and class indices)")
    idx = idx.astype(np.int64)
    lab = lab.astype(np.int64)
    if idx.min() < 0 or idx.max() >= outputs.n_items:
        raise MoLAMError(f"labeled_idx out of range [0, {outputs.n_items}): min {idx.min()}, max {idx.max()}")
    if len(np.unique(idx)) != len(idx):
        raise MoLAMError("labeled_idx has duplicate rows")
    if lab.min() < 0 or lab.max() >= outputs.n_classes:
        raise MoLAMError(
            f"labels out of range [0, {outputs.n_classes}) for classes {outputs.class_names}: "
            f"min {lab.min()}, max {lab.max()}"
        )
    return idx, lab


def jsonable(x: Any) -> Any:
    """numpy arrays and scalars inside ``x`` in a JSON-able form (:func:`unjson` reverses it)."""
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def unjson(x: Any) -> Any:
    if isinstance(x, dict):
        if "__ndarray__" in x:
            return np.asarray(x["__ndarray__"], dtype=x["dtype"])
        return {k: unjson(v) for k, v in x.items()}
    if isinstance(x, list):
        return [unjson(v) for v in x]
    return x


#: every aggregator class by its ``kind`` (filled as the classes are defined)
KINDS: dict[str, type[Aggregator]] = {}


class Aggregator:
    """Common face of MoLAM and the baselines: fit / predict_proba / predict / save / load."""

    kind: ClassVar[str] = "aggregator"
    # fitted by every fit (or load)
    class_names: list[str] | None = None
    llm_names: list[str] | None = None
    metadata: dict[str, Any]

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.kind != "aggregator":
            KINDS[cls.kind] = cls

    def __init__(self) -> None:
        self.metadata = {}

    # -- to override -------------------------------------------------------------------------------
    def _validate(self) -> None:
        """Check the parameters (called by :meth:`fit`); raise MoLAMError naming the bad one."""

    def _fit(self, outputs: LLMOutputs, idx: np.ndarray, labels: np.ndarray) -> None:
        raise NotImplementedError

    def _predict(self, outputs: LLMOutputs) -> np.ndarray:
        raise NotImplementedError

    def _saved_params(self) -> dict[str, Any]:
        """The parameters written to a saved file (default: :meth:`get_params`)."""
        return self.get_params()

    def _state(self) -> dict[str, Any]:
        return {}

    def _set_state(self, state: dict[str, Any]) -> None:
        pass

    # -- public ------------------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """The constructor's parameters as stored on the object (scikit-learn's convention)."""
        sig = inspect.signature(type(self).__init__)
        return {name: getattr(self, name) for name in sig.parameters if name != "self"}

    def fit(self, outputs: LLMOutputs, labeled_idx: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray):
        """Fit on ``outputs`` (the whole pool; unlabeled rows may be used) with seed labels ``labels``
        (class indices) at rows ``labeled_idx``. Returns self."""
        self._validate()
        idx, lab = check_fit_inputs(outputs, labeled_idx, labels)
        t0 = time.perf_counter()
        self.class_names = list(outputs.class_names)
        self.llm_names = list(outputs.llm_names)
        self.metadata = {}
        self._fit(outputs, idx, lab)
        counts = np.bincount(lab, minlength=outputs.n_classes)
        self.metadata.update(
            {
                "kind": self.kind,
                "molal_version": __version__,
                "format_version": FORMAT_VERSION,
                "class_names": self.class_names,
                "llm_names": self.llm_names,
                "n_pool": int(outputs.n_items),
                "n_seeds": int(len(idx)),
                "seed_class_counts": {c: int(n) for c, n in zip(self.class_names, counts, strict=True)},
                "classes_unseen_in_seeds": [c for c, n in zip(self.class_names, counts, strict=True) if n == 0],
                "has_consistency": outputs.consistency is not None,
                "fit_seconds": round(time.perf_counter() - t0, 4),
                "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "params": self._saved_params(),
            }
        )
        return self

    def _check_predict(self, outputs: LLMOutputs) -> None:
        if self.class_names is None:
            raise MoLAMError(f"{type(self).__name__} is not fitted: call fit() or load() first")
        if not isinstance(outputs, LLMOutputs):
            raise MoLAMError(f"outputs must be an LLMOutputs, got {type(outputs).__name__}")
        if list(outputs.class_names) != self.class_names:
            raise MoLAMError(f"class names {outputs.class_names} do not match the fitted ones {self.class_names}")
        if list(outputs.llm_names) != self.llm_names:
            raise MoLAMError(f"LLM names {outputs.llm_names} do not match the fitted ones {self.llm_names}")
        if bool(self.metadata.get("has_consistency")) and outputs.consistency is None:
            raise MoLAMError("this model was fitted with consistency (sampled answers); these outputs have none")

    def predict_proba(self, outputs: LLMOutputs) -> np.ndarray:
        """(n, K) class distribution per item; rows sum to 1."""
        self._check_predict(outputs)
        p = np.asarray(self._predict(outputs), dtype=np.float64)
        p = np.clip(p, 0.0, None)
        return normalize_rows(p)

    def predict(self, outputs: LLMOutputs) -> np.ndarray:
        """(n,) predicted class indices."""
        return self.predict_proba(outputs).argmax(axis=1)

    def to_dict(self) -> dict[str, Any]:
        if self.class_names is None:
            raise MoLAMError("cannot save an unfitted aggregator")
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "molal_version": __version__,
            "class_names": self.class_names,
            "llm_names": self.llm_names,
            "params": jsonable(self._saved_params()),
            "metadata": jsonable(self.metadata),
            "state": jsonable(self._state()),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the fitted model as one JSON file, atomically (class/LLM names, version, metadata)."""
        data = json.dumps(self.to_dict(), ensure_ascii=False).encode("utf-8")
        return atomic_write_bytes(path, data, mode=0o644)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Aggregator:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise MoLAMError("not a molal aggregator file")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise MoLAMError(f"aggregator format version {d['format_version']} is newer than this molal")
        kind = d.get("kind")
        if kind not in KINDS:
            raise MoLAMError(f"unknown aggregator kind {kind!r}")
        klass = KINDS[kind]
        if cls is not Aggregator and not issubclass(klass, cls):
            raise MoLAMError(f"file holds a {klass.__name__}, not a {cls.__name__}")
        obj = klass(**unjson(d.get("params", {})))
        obj._validate()
        obj.class_names = list(d["class_names"])
        obj.llm_names = list(d["llm_names"])
        obj.metadata = unjson(d.get("metadata", {}))
        obj._set_state(unjson(d.get("state", {})))
        return obj

    @classmethod
    def load(cls, path: str | os.PathLike[str]):
        """Read a model written by :meth:`save`."""
        p = Path(path)
        if not p.exists():
            raise MoLAMError(f"{p}: model file not found")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MoLAMError(f"{p}: cannot read model file ({exc})") from exc
        try:
            return cls.from_dict(d)
        except MoLAMError as exc:
            raise MoLAMError(f"{p}: {exc}") from None


def load_aggregator(path: str | os.PathLike[str]) -> Aggregator:
    """Load any aggregator (MoLAM or a baseline) saved with ``save``."""
    return Aggregator.load(path)
