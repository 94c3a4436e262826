"""Each member of a mixture measured on the seeds: does it help, or could it hurt?

A member (an LLM or a scorer) is measured on the human-labelled seeds only, as MoLAM's model selection is:

* ``seed_accuracy``: how often its top class is the seed's label;
* ``chance``: the accuracy a labeller that ignores the text would reach with the same answer frequencies
  (the member's share of each class over the pool, times the seeds' share of it, summed: Cohen's chance
  agreement); at or below it, the member's votes carry no information about the label;
* ``top_share``: the share of the pool given to its most frequent class; a member that puts nearly everything
  into one class that the seeds do not have nearly everywhere has *collapsed* (a small LLM whose prompt
  or calibration fails does this). Without seeds the other members' majority vote stands in for them.

:func:`check_members` flags members at or below chance and collapsed ones, with what to try; the training
job reports them (its result's ``members``), ``molal annotate`` prints them, the demo's table marks them.
MoLAM then decides on the seeds whether it keeps them (:class:`molal.aggregation.molam.MoLAM`,
``drop_members``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from molal.data import LLMOutputs

#: a member whose most frequent class takes at least this share of the pool ...
COLLAPSE_SHARE = 0.8
#: ... while that class's share among the seeds is this much lower, has collapsed onto it
COLLAPSE_MARGIN = 0.3


@dataclass(frozen=True)
class MemberCheck:
    """One member measured on the seeds (see the module docstring)."""

    name: str
    kind: str  # "llm" or "scorer"
    seed_accuracy: float
    chance: float
    top_class: str
    top_share: float  # share of the pool
    top_seed_share: float  # share of the seeds labelled top_class (without seeds: of the others' majority vote)
    n_seeds: int
    problem: str | None = None  # None, "at or below chance" or "collapsed onto <class>"
    calibrated: bool = False  # the member divides by a measured bias (``calibrate``): that may be the cause

    @property
    def advice(self) -> str | None:
        """What to try, for a flagged member (None otherwise)."""
        if self.problem is None:
            return None
        what = ("describe the classes (a hint on each <Choice> in Label Studio, or a [descriptions] table in the "
                "mixture file)")
        if self.kind == "llm" and self.calibrated:
            return (f"{what}; its calibrate = \"content_free\" may be the cause (dividing by a bias measured on "
                    "other inputs can move every text to one class): try it without calibrate, or a preset that "
                    "fits the data; or remove it from the mixture. MoLAM keeps it only where the seeds show it helps")
        if self.kind == "llm":
            return (f"{what}; for a small LLM add calibrate = \"content_free\" (chat models also prefill = true), or "
                    "a preset that fits the data; or remove it from the mixture. MoLAM keeps it only where the "
                    "seeds show it helps")
        return f"{what}, or remove it from the mixture. MoLAM keeps it only where the seeds show it helps"

    def line(self) -> str:
        """One line for a job's result, a command's summary or a log."""
        on = (f"{self.seed_accuracy:.2f} on {self.n_seeds} labels (chance {self.chance:.2f}), " if self.n_seeds
              else "")
        head = f"{self.name}: {on}{self.top_share:.0%} of the texts {self.top_class!r}"
        return head if self.problem is None else f"{head}: {self.problem}; try: {self.advice}"

    def as_dict(self) -> dict:
        out = asdict(self)
        for k in ("seed_accuracy", "chance", "top_share", "top_seed_share"):
            out[k] = round(float(out[k]), 4)
        out["advice"] = self.advice
        return out


def check_members(outputs: LLMOutputs, idx: Sequence[int] | np.ndarray, labels: Sequence[int] | np.ndarray,
                  kinds: Mapping[str, str] | None = None, calibrated: Collection[str] = ()) -> list[MemberCheck]:
    """Each member of ``outputs`` measured on the seeds ``idx`` (rows of ``outputs``) with labels ``labels``
    (class indices): see the module docstring. Without seeds only a collapse can be seen. ``kinds``: member
    name -> ``"llm"`` / ``"scorer"`` (default ``"llm"``); ``calibrated``: the members whose answers are
    calibrated (``calibrate`` set), whose advice then names the calibration as a possible cause."""
    idx = np.asarray(idx, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if len(idx) != len(labels):
        raise ValueError(f"{len(idx)} seed rows for {len(labels)} labels")
    k = outputs.n_classes
    pred = outputs.normalized_probs().argmax(axis=2)  # (n, L)
    seed_share = np.bincount(labels, minlength=k) / max(1, len(labels))
    out = []
    for j, name in enumerate(outputs.llm_names):
        share = np.bincount(pred[:, j], minlength=k) / max(1, len(pred))
        top = int(share.argmax())
        acc = float((pred[idx, j] == labels).mean()) if len(idx) else float("nan")
        chance = float((share * seed_share).sum()) if len(idx) else float("nan")
        if not len(idx):  # no labels: the other members' majority vote is the reference
            others = np.delete(pred, j, axis=1)
            if others.shape[1]:
                votes = np.zeros((len(pred), k))
                for c in range(others.shape[1]):
                    votes[np.arange(len(pred)), others[:, c]] += 1
                seed_share = np.bincount(votes.argmax(axis=1), minlength=k) / max(1, len(pred))
            else:
                seed_share = np.zeros(k)
        problem = None
        if share[top] >= COLLAPSE_SHARE and share[top] - seed_share[top] >= COLLAPSE_MARGIN:
            problem = f"collapsed onto {outputs.class_names[top]!r}"
        elif len(idx) and acc <= chance:
            problem = "at or below chance"
        out.append(MemberCheck(name=name, kind=(kinds or {}).get(name, "llm"), seed_accuracy=acc, chance=chance,
                               top_class=outputs.class_names[top], top_share=float(share[top]),
                               top_seed_share=float(seed_share[top]), n_seeds=len(idx), problem=problem,
                               calibrated=name in set(calibrated)))
    return out


def flagged(checks: Sequence[MemberCheck]) -> list[MemberCheck]:
    """The members with a problem."""
    return [c for c in checks if c.problem is not None]


__all__ = ["COLLAPSE_MARGIN", "COLLAPSE_SHARE", "MemberCheck", "check_members", "flagged"]
