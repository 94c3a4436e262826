"""One round of the active-learning loop, in one place: :class:`Learner`.

``molal simulate`` (:mod:`molal.simulate`) and the Label Studio training job (:mod:`molal.service.train`)
both run their rounds through a :class:`Learner`; only where the labels come from (gold seeds and a
simulated person, or Label Studio annotations) and where the results go (a result file, or Label Studio
and the project's state) differ. A round:

1. **Training set** (:class:`TrainingSet`): human labels (seeds, annotations, gold in simulation) with
   weight 1 and no negative labels, plus machine labels (MoLAM's, or a baseline's) with a discrepancy
   weight and the classes the LLMs rule out (:func:`molal.molam.negative_labels`).
2. **Fit** the student with the noise-robust loss at λ_t (:meth:`Learner.fit`).
3. **Query** ``budget`` unlabelled rows with the strategy over the new student (:meth:`Learner.query`).
4. **Split** (the hybrid loop): the ``human_per_round`` queried rows with the least confident machine
   labels go to people; the others get machine labels (:meth:`Learner.label_batch`).
5. **Stopping check** (:class:`StoppingRule`, beyond the paper): are the student's predictions on a fixed
   sample of unlabelled rows still changing?

Fidelity to the paper's code (MoLLIA), each with a switch:

* ``weights="at_add"`` (MoLLIA): a machine label's discrepancy weight (α where the student disagrees with
  it, else 1) is computed once, by the student of the round that queried the row, and kept. ``"each_round"``
  recomputes it every round against the previous round's student (molal's simulate until 2026-12).
* ``round_offset=1`` (MoLLIA): λ_t = 0.4 + 0.06·(t + 1), the seed round counting as round 1 (λ 0.52 … 1.12
  over the MoLAM rounds of a 12-round run); ``0`` starts at λ 0.4 (molal until 2026-12).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from molal.loss import discrepancy_weights

WEIGHTINGS = ("at_add", "each_round")


@dataclass
class MachineLabel:
    """A label given by the machine labeller: class, discrepancy weight, negative classes, and the round whose
    student queried the row."""

    label: int
    weight: float
    negatives: tuple[int, ...] = ()
    round: int = 0


@dataclass
class TrainingSet:
    """The labelled rows of a pool, in the order they were added: ``human`` (row -> class) and ``machine``
    (row -> :class:`MachineLabel`). A row in both counts as human (a person's label overrides the machine's).
    The order matters: it is the order the student sees them in (its shuffling is seeded by position).

    ``prev_pred`` (row -> class) is what the previous round's student predicted, for ``weights="each_round"``
    (the learner fills it as rounds go; the served review loop fills it from the last published student)."""

    human: dict[int, int] = field(default_factory=dict)
    machine: dict[int, MachineLabel] = field(default_factory=dict)
    prev_pred: dict[int, int] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        seen = set(self.order)
        for r in [*self.human, *self.machine]:  # rows given as dicts only: humans first
            if r not in seen:
                seen.add(r)
                self.order.append(r)

    def add_human(self, row: int, label: int) -> None:
        if row not in self:
            self.order.append(int(row))
        self.human[int(row)] = int(label)

    def add_machine(self, row: int, label: MachineLabel) -> None:
        if row not in self:
            self.order.append(int(row))
        self.machine[int(row)] = label

    def rows(self) -> list[int]:
        """Every labelled row, in the order added."""
        return list(self.order)

    def __contains__(self, row: object) -> bool:
        return row in self.human or row in self.machine

    def __len__(self) -> int:
        return len(self.order)


@dataclass
class RoundData:
    """What the student is fitted on: pool ``rows``, labels ``y``, CE ``weights``, ``negatives`` (n, K), and
    which rows are human-labelled."""

    rows: np.ndarray
    y: np.ndarray
    weights: np.ndarray
    negatives: np.ndarray
    is_human: np.ndarray


@dataclass
class Query:
    """A queried batch: ``rows`` in the strategy's order, split into ``to_machine`` (in that order) and
    ``to_human`` (least confident machine label first); ``pred`` (row -> class) is the querying student's
    prediction for each queried row."""

    rows: list[int]
    to_machine: list[int]
    to_human: list[int]
    pred: dict[int, int] = field(default_factory=dict)


class Learner:
    """The active-learning round (module docstring). Parameters are stored as given and checked here;
    the learner keeps no per-run state (that lives in the :class:`TrainingSet`).

    Args:
        strategy: query strategy name (:data:`molal.query.STRATEGIES`).
        budget: rows queried per round.
        human_per_round: of each queried batch, the rows with the least confident machine labels that go
            to people instead (the hybrid loop; 0 = the paper's human-free loop).
        alpha: CE weight of a machine label the student disagrees with.
        weights: ``"at_add"`` (MoLLIA) or ``"each_round"``.
        round_offset: added to the round number in λ_t (1 = MoLLIA).
        loss: ``"robust"`` (weights and negatives) or ``"ce"`` (plain cross-entropy on all labels).
        candidates: score at most this many random unlabelled rows per query (None = all).
        strategy_options: keyword arguments of the strategy (e.g. ``{"variance_term": False}`` for BEMPS).
    """

    def __init__(self, strategy: str = "random", *, budget: int = 50, human_per_round: int = 0,
                 alpha: float = 0.5, weights: Literal["at_add", "each_round"] = "at_add", round_offset: int = 1,
                 loss: Literal["robust", "ce"] = "robust", candidates: int | None = None,
                 strategy_options: dict[str, Any] | None = None) -> None:
        from molal.query import get_strategy

        self.strategy_options = dict(strategy_options or {})
        self.strategy = get_strategy(strategy, **self.strategy_options)  # a clear error naming the valid ones
        if int(budget) < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        if not 0 <= int(human_per_round) <= int(budget):
            raise ValueError(f"human_per_round must be in [0, budget={budget}], got {human_per_round}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if weights not in WEIGHTINGS:
            raise ValueError(f"weights must be one of {WEIGHTINGS}, got {weights!r}")
        if int(round_offset) < 0:
            raise ValueError(f"round_offset must be >= 0, got {round_offset}")
        if loss not in ("robust", "ce"):
            raise ValueError(f"loss must be 'robust' or 'ce', got {loss!r}")
        if candidates is not None and int(candidates) < int(budget):
            raise ValueError(f"candidates ({candidates}) must be >= budget ({budget})")
        self.budget = int(budget)
        self.human_per_round = int(human_per_round)
        self.alpha = float(alpha)
        self.weights = weights
        self.round_offset = int(round_offset)
        self.loss = loss
        self.candidates = None if candidates is None else int(candidates)

    def params(self) -> dict[str, Any]:
        return {"strategy": self.strategy.name, "strategy_options": self.strategy_options, "budget": self.budget,
                "human_per_round": self.human_per_round,
                "alpha": self.alpha, "weights": self.weights, "round_offset": self.round_offset, "loss": self.loss,
                "candidates": self.candidates}

    # -- 1. the training set -------------------------------------------------------------------------------
    def round_data(self, ts: TrainingSet, n_classes: int) -> RoundData:
        """The arrays the student is fitted on (step 1 of the module docstring)."""
        rows = ts.rows()
        if not rows:
            raise ValueError("the training set is empty")
        is_h = np.array([r in ts.human for r in rows], dtype=bool)
        y = np.array([ts.human[r] if h else ts.machine[r].label for r, h in zip(rows, is_h, strict=True)],
                     dtype=np.int64)
        neg = np.zeros((len(rows), n_classes), dtype=bool)
        if self.loss == "ce":
            return RoundData(np.asarray(rows, np.int64), y, np.ones(len(rows), np.float32), neg, is_h)
        for i, (r, h) in enumerate(zip(rows, is_h, strict=True)):
            if not h:
                neg[i, list(ts.machine[r].negatives)] = True
        if self.weights == "at_add":
            w = np.array([1.0 if h else ts.machine[r].weight for r, h in zip(rows, is_h, strict=True)],
                         dtype=np.float32)
        else:
            prev = np.array([ts.prev_pred.get(r, -1) for r in rows], dtype=np.int64) if ts.prev_pred else None
            w = discrepancy_weights(prev, y, is_human=is_h, alpha=self.alpha)
        return RoundData(np.asarray(rows, np.int64), y, w, neg, is_h)

    # -- 2. fit --------------------------------------------------------------------------------------------
    def lambda_round(self, t: int) -> int:
        """The round number λ_t is computed with (``t`` + ``round_offset``)."""
        return int(t) + self.round_offset

    def fit(self, student: Any, texts: Sequence[str], ts: TrainingSet, round_t: int, *,
            val_labels: dict[int, int] | None = None, progress: bool = False) -> RoundData:
        """Fit ``student`` on the training set (texts indexed by pool row) for round ``round_t``; the best
        epoch is picked on the human rows (``val_labels`` overrides their labels, e.g. gold in simulation).
        With ``weights="each_round"`` the new student's predictions on the training rows are kept in
        ``ts.prev_pred`` for the next round's weights. Returns what it was fitted on."""
        d = self.round_data(ts, len(student.class_names))
        h_rows = d.rows[d.is_human]
        val_y = np.array([(val_labels or ts.human)[int(r)] for r in h_rows], dtype=np.int64)
        student.fit([texts[r] for r in d.rows], d.y, weights=d.weights, negatives=d.negatives,
                    round_t=self.lambda_round(round_t), val_texts=[texts[r] for r in h_rows], val_labels=val_y,
                    progress=progress)
        if self.weights == "each_round" and self.loss == "robust":
            pred = student.predict([texts[r] for r in d.rows])
            ts.prev_pred.update(zip(d.rows.tolist(), np.asarray(pred).tolist(), strict=True))
        return d

    # -- 3 + 4. query and split ------------------------------------------------------------------------------
    def query(self, student: Any, texts: Sequence[str], ts: TrainingSet, machine_probs: np.ndarray,
              rng: np.random.Generator, *, pool_rows: Sequence[int] | None = None, budget: int | None = None,
              certified: np.ndarray | None = None) -> Query:
        """Pick ``budget`` (default: the learner's) rows among ``pool_rows`` (default: every row of
        ``texts``) not in the training set, with the strategy over ``student``; split them (hybrid) by the
        machine labeller's confidence ``machine_probs`` (indexed by pool row). ``certified`` (bool per pool
        row, :mod:`molal.trust`): only those rows may get a machine label; the others go to people too."""
        from molal.molam import least_confident
        from molal.query import QueryPool, build_pool

        b = self.budget if budget is None else int(budget)
        rows = np.arange(len(texts)) if pool_rows is None else np.asarray(pool_rows, dtype=np.int64)
        cand = np.array([r for r in rows.tolist() if r not in ts], dtype=np.int64)
        if self.candidates is not None and len(cand) > self.candidates:
            cand = np.sort(rng.choice(cand, size=self.candidates, replace=False))
        if len(cand) == 0:
            return Query([], [], [])
        k = len(student.class_names)
        if self.strategy.name == "random":  # needs no model output: skip the forward pass
            pool = QueryPool(probs=np.full((len(cand), k), 1.0 / k))
        else:
            pool = build_pool(self.strategy, student, [texts[r] for r in cand], [texts[r] for r in ts.rows()])
        pick = np.asarray(self.strategy.select(pool, min(b, len(cand)), rng), dtype=np.int64)
        batch = cand[pick]
        if self.strategy.name == "random":
            pred = np.asarray(student.predict([texts[r] for r in batch])) if len(batch) else np.zeros(0, np.int64)
        else:
            pred = pool.probs[pick].argmax(1)
        mp = np.asarray(machine_probs)
        to_human: list[int] = []  # least confident first (the order they head the labelling queue in)
        if self.human_per_round and len(batch):
            to_human = [int(batch[i]) for i in least_confident(mp[batch], self.human_per_round)]
        sent = set(to_human)
        if certified is not None:
            ok = np.asarray(certified, dtype=bool)
            to_human += [int(r) for r in batch if int(r) not in sent and not ok[int(r)]]
            sent = set(to_human)
        return Query(rows=batch.tolist(), to_machine=[int(r) for r in batch if int(r) not in sent], to_human=to_human,
                     pred={int(r): int(p) for r, p in zip(batch.tolist(), pred.tolist(), strict=True)})

    def label_batch(self, ts: TrainingSet, q: Query, machine_probs: np.ndarray, negatives: np.ndarray,
                    round_t: int, human: dict[int, int] | None = None) -> list[int]:
        """Add the queried rows to the training set, in the strategy's order: ``q.to_machine`` with their
        machine label (argmax of ``machine_probs``), negatives, and discrepancy weight against the querying
        student (``q.pred``); ``q.to_human`` with the label in ``human`` where one is given (a simulated
        person), else not at all (they wait for people). Returns the machine-labelled rows."""
        mp, neg = np.asarray(machine_probs), np.asarray(negatives, dtype=bool)
        rows = list(q.to_machine)
        labels: dict[int, MachineLabel] = {}
        if rows:
            y = mp[rows].argmax(1)
            w = discrepancy_weights(np.array([q.pred.get(r, -1) for r in rows]), y, alpha=self.alpha)
            for r, lab, wt in zip(rows, y.tolist(), w.tolist(), strict=True):
                labels[r] = MachineLabel(int(lab), float(wt), tuple(np.flatnonzero(neg[r]).tolist()), int(round_t))
        for r in q.rows:
            if r in labels:
                ts.add_machine(r, labels[r])
            elif human is not None and r in human:
                ts.add_human(r, human[r])
        if self.weights == "each_round":
            ts.prev_pred.update({r: q.pred[r] for r in q.rows if r in q.pred})
        return rows


# -- 5. when to stop ------------------------------------------------------------------------------------------
def cohen_kappa(a: np.ndarray, b: np.ndarray, n_classes: int) -> float:
    """Cohen's κ between two label vectors (1.0 when both are identical, also when constant)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    if len(a) == 0:
        return 1.0
    po = float((a == b).mean())
    pa = np.bincount(a, minlength=n_classes) / len(a)
    pb = np.bincount(b, minlength=n_classes) / len(b)
    pe = float((pa * pb).sum())
    return 1.0 if pe >= 1.0 else (po - pe) / (1.0 - pe)


@dataclass
class StoppingRule:
    """Stabilising predictions (Bloodgood & Vijay-Shanker, CoNLL 2009): after each round the student labels
    a fixed *stop set* of unlabelled rows; the loop may stop once Cohen's κ between successive rounds'
    predictions on it has stayed at or above ``kappa`` for ``window`` consecutive rounds.

    ``check(history)`` takes the κ values so far (one per round after the first) and says whether the rule
    is met; :func:`stop_set` draws the sample."""

    kappa: float = 0.99
    window: int = 3
    size: int = 1000

    def check(self, kappas: Sequence[float | None]) -> bool:
        last = [k for k in kappas[-self.window:] if k is not None]
        return len(last) == self.window and min(last) >= self.kappa

    @staticmethod
    def agreement(prev: Mapping[Any, int] | None, now: Mapping[Any, int], n_classes: int) -> float | None:
        """κ between the last round's and this round's predictions on the stop-set items both have
        (None without a last round)."""
        if not prev:
            return None
        common = [key for key in now if key in prev]
        return cohen_kappa(np.array([prev[key] for key in common]), np.array([now[key] for key in common]), n_classes)

    def stop_set(self, n_rows: int, seed: int = 0) -> np.ndarray:
        """A fixed random sample of pool rows (sorted), the same for every round of a run."""
        rng = np.random.default_rng(seed + 7919)
        return np.sort(rng.choice(n_rows, size=min(self.size, n_rows), replace=False))


__all__ = ["Learner", "MachineLabel", "Query", "RoundData", "StoppingRule", "TrainingSet", "cohen_kappa"]
