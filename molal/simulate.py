"""The human-free active-learning loop on recorded LLM outputs (``molal simulate``), usable as a library.

Cold start: ``n_initial`` random items of the pool get their gold labels (the seeds) → the labeller (MoLAM,
or a baseline) is trained on them once → round 0 trains the student on the seeds → each round t = 1..R:
the query strategy picks ``budget`` unlabelled items with the last round's student, the labeller labels them
(no gold), the student is re-trained from its start weights on everything labelled so far with the paper's
noise-robust loss (λ_t, discrepancy weights, negative labels of the LLM-labelled items), and is evaluated on
the test split. Each round is :class:`molal.learner.Learner`'s, the code the Label Studio training job runs
(``weights``/``round_offset`` choose between the paper's code and molal's earlier loop; the stopping rule is
reported per round: ``stop_kappa``, ``stop_rule_met``). R = 11 by default: 50 → 600 items, the paper's 12
rounds counting the seed round.

Label modes (``mode``):

* ``molam``    — MoLAM labels (the paper);
* ``oracle``   — gold labels (ORACLE; every item counts as human-labelled, so the loss is plain CE);
* ``best_llm`` — the single LLM most accurate on the seeds (``molal.molam.BestSingleLLM``);
* ``majority`` — majority vote of the LLMs (``molal.molam.MajorityVote``);
* ``hybrid``   — MoLAM labels, but the ``human_per_round`` least-confident MoLAM labels of each batch are
  replaced by the gold labels (a human budget); those items count as human-labelled.

``certify_epsilon`` (``--certify-epsilon``; ``molam`` and ``hybrid`` modes) is the served loop's ``auto_label``:
an audit of ``audit`` items drawn uniformly at random from the non-seed pool is labelled by people (gold) and
held out (never trained on, never queried); :func:`molal.trust.certify` sets MoLAM's certified threshold from
it, and only queried items at or above the threshold get MoLAM's label — the others go to people (gold) too,
as the training job routes them (:meth:`molal.learner.Learner.query`'s ``certified``). The result's metadata
says the threshold, the coverage and how many labels people gave.

``molam_text_features`` (e.g. ``"minilm"``; ``--molam-text-features`` on the CLI) gives MoLAM, in the
``molam`` and ``hybrid`` modes, its transductive text model: the pool's texts are embedded and a classifier
cross-fitted on the whole pool's MoLAM labels (+ the seeds) corrects them (see ``molal.molam.MoLAM``).

Data: by default the pool is the recorded outputs of the real LLMs on TREC train (5,452 rows, gold labels
from the same files) and the test split is ``shared/data/trec/test.jsonl`` (500 rows). If the shared data is
missing, the bundled ``molal/assets/trec_recorded.npz`` + ``trec.jsonl`` are the pool; if no test split is
found, a fixed 10% of the pool (seeded independently of the run seed) is held out for testing, and the
result's ``notes`` say so.

The best student epoch is chosen on the seed/human-labelled items only (never on test or gold labels of
LLM-labelled items).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from molal.config import STUDENT_MAX_STEPS
from molal.data import DataError, LLMOutputs, load_dataset

RESULT_FORMAT = "molal.SimulationResult"
RESULT_FORMAT_VERSION = 1
MODES = ("molam", "oracle", "best_llm", "majority", "hybrid")
HOLDOUT_SEED = 20260123


@dataclass
class SimulationConfig:
    """Everything that defines one simulated AL run (all saved into the result JSON)."""

    dataset: str = "trec"
    annotations: str | None = None  # .npz LLMOutputs, a folder of recorded *.jsonl, or comma-separated .jsonl
    pool_labels: str | None = None  # JSONL with the gold labels of the pool rows (same order)
    test: str | None = None  # JSONL test split (default: the dataset's test.jsonl)
    strategy: str = "random"
    strategy_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the strategy
    mode: Literal["molam", "oracle", "best_llm", "majority", "hybrid"] = "molam"
    rounds: int = 11  # after the seed round: 50 -> 600 items, the paper's 12 rounds
    budget: int = 50
    n_initial: int = 50
    human_per_round: int = 10  # hybrid mode: gold labels per round
    # molam / hybrid modes: only labels certified at this error level go to the student unreviewed (None = off)
    certify_epsilon: float | None = None
    certify_delta: float = 0.1
    audit: int = 200  # with certify_epsilon: random items people label to certify on (held out)
    seed: int = 0
    # molam / hybrid modes: MoLAM's transductive text model (a sentence encoder, e.g. "minilm"; None = off)
    molam_text_features: str | None = None
    # MoLAM's candidate aggregators, comma-separated (e.g. "lr_0.1,ds,best_single"; None = all), as the
    # project setting molam_candidates of the backend
    molam_candidates: str | None = None
    # student
    encoder: str = "minilm"
    max_length: int = 64  # TREC questions are <= 41 MiniLM tokens: 64 is lossless there
    epochs: int = 3
    min_steps: int = 60  # small early rounds get at least this many optimiser steps (50 seeds: 20 epochs)
    max_steps: int = STUDENT_MAX_STEPS  # big rounds get at most this many, in whole epochs (as the backend's)
    batch_size: int = 16
    lr: float = 5e-5
    warmup: float = 0.1
    freeze_encoder: bool = False
    device: str = "auto"
    # loss
    loss: Literal["robust", "ce"] = "robust"
    alpha: float = 0.5
    # fidelity to the paper's code (molal.learner): "at_add" keeps each machine label's discrepancy weight from
    # the round that queried it (MoLLIA); "each_round" recomputes it against the previous round's student
    weights: Literal["at_add", "each_round"] = "at_add"
    round_offset: int = 1  # λ_t counts the seed round as round 1 (MoLLIA); 0 = molal before 2026-12
    # the stopping rule (molal.learner.StoppingRule): reported per round, never enforced here
    stop_kappa: float = 0.99
    stop_window: int = 3
    stop_set: int = 1000
    neg_threshold: float = 1e-3
    lambda_base: float = 0.4
    lambda_step: float = 0.06
    # cost controls
    candidates: int | None = None  # random unlabelled candidates scored per round (None = the whole pool)
    pool_limit: int | None = None  # use a random subset of the pool (tests, quick runs)
    test_limit: int | None = None  # use the first N test items
    threads: int | None = None  # torch CPU threads (None = torch default)
    progress: bool = True

    def validate(self) -> None:
        from molal.query import get_strategy

        get_strategy(self.strategy, **self.strategy_options)  # clear error listing the valid names/options
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; valid: {', '.join(MODES)}")
        for name in ("rounds", "budget", "n_initial"):
            if getattr(self, name) < (0 if name == "rounds" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.mode == "hybrid" and not 0 <= self.human_per_round <= self.budget:
            raise ValueError(f"human_per_round must be in [0, budget={self.budget}]")
        if self.certify_epsilon is not None:
            if self.mode not in ("molam", "hybrid"):
                raise ValueError(f"certify_epsilon applies to the molam and hybrid modes, not {self.mode!r}")
            if not 0 < self.certify_epsilon < 1 or not 0 < self.certify_delta < 1:
                raise ValueError(f"certify_epsilon and certify_delta must be in (0, 1), got {self.certify_epsilon}"
                                 f" and {self.certify_delta}")
            if self.audit < 1:
                raise ValueError(f"audit must be at least 1 item, got {self.audit}")
        if self.loss not in ("robust", "ce"):
            raise ValueError(f"loss must be 'robust' or 'ce', got {self.loss!r}")
        if self.molam_text_features is not None and not str(self.molam_text_features).strip():
            raise ValueError("molam_text_features must be an encoder name/folder (e.g. 'minilm') or None")
        if self.candidates is not None and self.candidates < self.budget:
            raise ValueError(f"candidates ({self.candidates}) must be >= budget ({self.budget})")
        if self.weights not in ("at_add", "each_round"):
            raise ValueError(f"weights must be 'at_add' or 'each_round', got {self.weights!r}")
        if self.round_offset < 0:
            raise ValueError(f"round_offset must be >= 0, got {self.round_offset}")
        if not 0 < self.stop_kappa <= 1 or self.stop_window < 1 or self.stop_set < 0:
            raise ValueError("stop_kappa must be in (0, 1], stop_window >= 1, stop_set >= 0")


def mode_label(mode: str, molam_text_features: str | None) -> str:
    """``mode`` plus ``+text`` where MoLAM labels with its text model (molam and hybrid modes)."""
    return mode + ("+text" if molam_text_features and mode in ("molam", "hybrid") else "")


@dataclass
class SimulationResult:
    config: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def mode_label(self) -> str:
        """The mode, with ``+text`` when MoLAM used its text model."""
        return mode_label(self.config["mode"], self.config.get("molam_text_features"))

    @property
    def label(self) -> str:
        return f"{self.mode_label}/{self.config['strategy']}/seed{self.config['seed']}"

    @property
    def final(self) -> dict[str, Any]:
        return self.records[-1] if self.records else {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RESULT_FORMAT,
            "format_version": RESULT_FORMAT_VERSION,
            "config": self.config,
            "records": self.records,
            "notes": self.notes,
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        from molal.io import atomic_write_json

        return atomic_write_json(path, self.to_dict(), mode=0o644)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SimulationResult:
        p = Path(path)
        try:
            obj = json.loads(p.read_text())
        except FileNotFoundError:
            raise DataError(f"{p}: file not found") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or obj.get("format") != RESULT_FORMAT:
            raise DataError(f"{p}: not a molal simulation result")
        if int(obj.get("format_version", 0)) > RESULT_FORMAT_VERSION:
            raise DataError(f"{p}: result format version {obj['format_version']} is newer than this molal")
        return cls(config=obj["config"], records=obj["records"], notes=obj.get("notes", []), metadata=obj.get("metadata", {}))


# -- data ---------------------------------------------------------------------------------------------


@dataclass
class SimulationData:
    outputs: LLMOutputs  # the pool, with texts
    gold: np.ndarray  # (n,) gold labels of the pool
    test_texts: list[str]
    test_labels: np.ndarray
    notes: list[str]


def _class_names(dataset: str) -> list[str] | None:
    from molal.datasets import CLASS_NAMES

    return CLASS_NAMES.get(dataset)


def load_simulation_data(config: SimulationConfig) -> SimulationData:
    """The pool (recorded LLM outputs + gold labels) and the test split named by ``config``."""
    from molal.resources import asset_path, shared_data_dir

    notes: list[str] = []
    classes = _class_names(config.dataset)
    shared = shared_data_dir()
    ann = config.annotations
    if ann is None:
        if shared is not None and (shared / "llm-outputs" / config.dataset).is_dir():
            ann = str(shared / "llm-outputs" / config.dataset)
        elif config.dataset == "trec":
            ann = str(asset_path("trec_recorded.npz"))
        else:
            raise DataError(f"no recorded LLM outputs for dataset {config.dataset!r}; pass --annotations")
    p = Path(ann)
    gold: np.ndarray | None = None
    if p.suffix == ".npz":
        outputs = LLMOutputs.load(p)
        labels_path = config.pool_labels
        if labels_path is None and p.name == "trec_recorded.npz":
            labels_path = str(p.with_name("trec.jsonl"))
        if labels_path is None:
            raise DataError(f"{p}: an .npz pool needs --pool-labels (a JSONL with the gold label of each row)")
        ds = load_dataset(labels_path, class_names=outputs.class_names)
        if len(ds) != outputs.n_items:
            raise DataError(f"{labels_path}: {len(ds)} rows but the pool {p} has {outputs.n_items}")
        if outputs.texts is None:
            outputs.texts = ds.texts
        gold = ds.labels
    else:
        if p.is_dir():
            paths = sorted(p.glob("*.jsonl"))
            if not paths:
                raise DataError(f"{p}: no *.jsonl recorded outputs in this folder")
        else:
            paths = [Path(x) for x in str(ann).split(",")]
        if classes is None:
            classes = load_dataset(paths[0]).class_names
        outputs = LLMOutputs.from_recorded_jsonl(paths, classes)
        ds = load_dataset(config.pool_labels or paths[0], class_names=outputs.class_names)
        if len(ds) != outputs.n_items:
            raise DataError(f"{config.pool_labels or paths[0]}: {len(ds)} label rows for a pool of {outputs.n_items}")
        gold = ds.labels
    if gold is None or (gold < 0).any():
        raise DataError("every pool row needs a gold label (to score labels and for the seeds/ORACLE)")
    notes.append(f"pool: {ann} ({outputs.n_items} rows, LLMs {outputs.llm_names})")

    test_path = config.test
    if test_path is None and shared is not None and (shared / config.dataset / "test.jsonl").exists():
        test_path = str(shared / config.dataset / "test.jsonl")
    if test_path is not None:
        test = load_dataset(test_path, class_names=outputs.class_names, require_labels=True)
        test_texts, test_labels = test.texts, test.labels
        notes.append(f"test: {test_path} ({len(test)} rows)")
    else:
        rng = np.random.default_rng(HOLDOUT_SEED)
        hold = np.sort(rng.choice(outputs.n_items, size=max(1, outputs.n_items // 10), replace=False))
        keep = np.setdiff1d(np.arange(outputs.n_items), hold)
        test_texts = [outputs.texts[i] for i in hold]  # type: ignore[index]
        test_labels = gold[hold]
        outputs, gold = outputs.subset(keep), gold[keep]
        notes.append(f"no test split found: held out a fixed 10% of the pool ({len(hold)} rows, seed {HOLDOUT_SEED}) for testing")
    if config.pool_limit is not None and config.pool_limit < outputs.n_items:
        rng = np.random.default_rng(HOLDOUT_SEED + 1)
        sub = np.sort(rng.choice(outputs.n_items, size=config.pool_limit, replace=False))
        outputs, gold = outputs.subset(sub), gold[sub]
        notes.append(f"pool limited to a fixed random {config.pool_limit} rows")
    if config.test_limit is not None and config.test_limit < len(test_texts):
        test_texts, test_labels = test_texts[: config.test_limit], test_labels[: config.test_limit]
        notes.append(f"test limited to its first {config.test_limit} rows")
    if outputs.n_items < config.n_initial + config.budget * config.rounds:
        raise DataError(
            f"pool of {outputs.n_items} rows is too small for {config.n_initial} seeds + {config.rounds}×{config.budget}"
        )
    return SimulationData(outputs, np.asarray(gold, np.int64), list(test_texts), np.asarray(test_labels, np.int64), notes)


# -- the loop -----------------------------------------------------------------------------------------


def _labeller(mode: str, config: SimulationConfig | None = None):
    from molal import molam

    if mode in ("molam", "hybrid"):
        cands = [c.strip() for c in config.molam_candidates.split(",") if c.strip()] \
            if config is not None and config.molam_candidates else None
        if config is not None and config.molam_text_features:
            return molam.MoLAM(candidates=cands, text_features=config.molam_text_features, text_device=config.device)
        return molam.MoLAM(candidates=cands)
    if mode == "majority":
        return molam.MajorityVote()
    if mode == "best_llm":
        return molam.BestSingleLLM()
    raise ValueError(mode)


def _f1(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="micro")), float(f1_score(y_true, y_pred, average="macro"))


def run_simulation(config: SimulationConfig, data: SimulationData | None = None, console: Any = None) -> SimulationResult:
    """Run the loop of the module docstring; returns per-round records (round 0 = seeds only). Each round
    is :class:`molal.learner.Learner`'s — the same code the Label Studio training job runs."""
    config.validate()
    from molal.learner import Learner, StoppingRule, TrainingSet
    from molal.student import Student

    if config.threads:
        import torch

        torch.set_num_threads(int(config.threads))
    t_start = time.perf_counter()
    data = data or load_simulation_data(config)
    out, gold = data.outputs, data.gold
    texts: list[str] = out.texts or []
    n, k = out.n_items, out.n_classes
    rng = np.random.default_rng(config.seed)
    seeds = rng.choice(n, size=config.n_initial, replace=False)

    # labeller, trained once on the seeds (the cold start)
    labeller_meta: dict[str, Any] = {"mode": config.mode}
    if config.mode == "oracle":
        label_probs = np.eye(k)[gold]
    else:
        t0 = time.perf_counter()
        lab = _labeller(config.mode, config).fit(out, seeds, gold[seeds])
        label_probs = np.asarray(lab.predict_proba(out))
        labeller_meta.update(type=type(lab).__name__, seconds=round(time.perf_counter() - t0, 3))
        if "text" in lab.metadata:
            labeller_meta["text"] = lab.metadata["text"]
    llm_label = label_probs.argmax(1)
    unseeded = np.setdiff1d(np.arange(n), seeds)
    labeller_meta["label_acc_on_non_seed_pool"] = float((llm_label[unseeded] == gold[unseeded]).mean())
    if config.mode == "oracle" or config.loss == "ce":
        negatives_all = np.zeros((n, k), dtype=bool)
    else:
        from molal.molam import negative_labels

        negatives_all = np.asarray(negative_labels(out, threshold=config.neg_threshold, predicted=label_probs), dtype=bool)

    # the served loop's auto_label: a random audit, held out, certifies MoLAM's threshold (molal.trust)
    audit = np.zeros(0, dtype=np.int64)
    certified: np.ndarray | None = None
    if config.certify_epsilon is not None:
        from molal.trust import certify_probs

        if config.audit >= len(unseeded):
            raise ValueError(f"audit ({config.audit}) must be smaller than the {len(unseeded)} non-seed pool items")
        audit = np.sort(np.random.default_rng([config.seed, 27]).choice(unseeded, config.audit, replace=False))
        conf = label_probs.max(1)
        cert = certify_probs(label_probs, audit, gold[audit], unseeded, config.certify_epsilon, config.certify_delta)
        certified = conf >= cert.threshold if cert.threshold is not None else np.zeros(n, dtype=bool)
        certified[audit] = False
        labeller_meta["certificate"] = {"epsilon": config.certify_epsilon, "delta": config.certify_delta,
                                        "audit": int(len(audit)), "threshold": cert.threshold,
                                        "coverage": cert.coverage, "reason": cert.reason, "method": cert.method}
    query_rows = np.setdiff1d(np.arange(n), audit) if len(audit) else None
    learner = Learner(config.strategy, budget=config.budget,
                      human_per_round=config.human_per_round if config.mode == "hybrid" else 0,
                      alpha=config.alpha, weights=config.weights, round_offset=config.round_offset, loss=config.loss,
                      candidates=config.candidates, strategy_options=config.strategy_options)
    student = Student(
        out.class_names,
        encoder=config.encoder,
        max_length=config.max_length,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        warmup=config.warmup,
        device=config.device,
        seed=config.seed,
        freeze_encoder=config.freeze_encoder,
        min_steps=config.min_steps,
        max_steps=config.max_steps,
        lambda_base=config.lambda_base,
        lambda_step=config.lambda_step,
    )
    ts = TrainingSet()
    for i in seeds:
        ts.add_human(int(i), int(gold[i]))
    stop_rule = StoppingRule(kappa=config.stop_kappa, window=config.stop_window, size=config.stop_set)
    stop_rows = stop_rule.stop_set(n, seed=config.seed)
    prev_stop_pred: dict[int, int] | None = None
    kappas: list[float | None] = []
    result = SimulationResult(
        config=asdict(config),
        notes=list(data.notes),
        metadata={
            "molal_version": __import__("molal").__version__,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "pool_size": n,
            "test_size": len(data.test_texts),
            "class_names": out.class_names,
            "labeller": labeller_meta,
            "learner": learner.params(),
            "seeds": [int(i) for i in seeds],
        },
    )
    if config.mode == "oracle":
        result.notes.append("ORACLE: every label is gold, all items count as human-labelled (loss = plain CE)")

    batch: list[int] = []
    q_seconds = 0.0
    for t in range(config.rounds + 1):
        t_round = time.perf_counter()
        tt = time.perf_counter()
        d = learner.fit(student, texts, ts, t, val_labels={r: int(gold[r]) for r in ts.human},
                        progress=config.progress)
        train_seconds = time.perf_counter() - tt
        te = time.perf_counter()
        pred = student.predict(data.test_texts)
        micro, macro = _f1(data.test_labels, pred)
        kappa = None
        if len(stop_rows):
            stop_pred = dict(zip(stop_rows.tolist(), student.predict([texts[r] for r in stop_rows]).tolist(), strict=True))
            kappa = stop_rule.agreement(prev_stop_pred, stop_pred, k)
            prev_stop_pred = stop_pred
        kappas.append(kappa)
        rec = {
            "round": t,
            "train_size": len(d.rows),
            "n_human": int(d.is_human.sum()),
            "n_llm_labeled": int((~d.is_human).sum()),
            "batch_label_acc": float(np.mean([(ts.human[r] if r in ts.human else ts.machine[r].label) == gold[r]
                                              for r in batch])) if batch else None,
            "train_label_acc": float((d.y == gold[d.rows]).mean()),
            "n_downweighted": int((d.weights < 1).sum()),
            "n_with_negatives": int(d.negatives.any(1).sum()),
            "micro_f1": micro,
            "macro_f1": macro,
            "best_epoch": student.metadata.get("best_epoch"),
            "stop_kappa": kappa,
            "stop_rule_met": stop_rule.check(kappas),
            "seconds_query": round(q_seconds, 2),
            "seconds_train": round(train_seconds, 2),
            "seconds_eval": round(time.perf_counter() - te, 2),
            "seconds_total": round(time.perf_counter() - t_round + q_seconds, 2),
        }
        result.records.append(rec)
        if console is not None:
            console(rec)
        if t == config.rounds:
            break
        # the next round's batch, queried by this round's student and labelled
        tq = time.perf_counter()
        q = learner.query(student, texts, ts, label_probs, rng, pool_rows=query_rows, certified=certified)
        if config.mode == "oracle":  # every queried row goes to the simulated person
            q.to_machine, q.to_human = [], list(q.rows)
        learner.label_batch(ts, q, label_probs, negatives_all, t, human={r: int(gold[r]) for r in q.to_human})
        batch = q.rows
        q_seconds = time.perf_counter() - tq
    stopped = next((r["round"] for r in result.records if r["stop_rule_met"]), None)
    result.metadata["stop_rule"] = {"kappa": stop_rule.kappa, "window": stop_rule.window, "stop_set": len(stop_rows),
                                    "first_round_met": stopped}
    result.metadata["human_labels"] = {"training": len(ts.human), "audit": int(len(audit))}  # what people gave
    result.metadata["seconds"] = round(time.perf_counter() - t_start, 2)
    return result


# -- plots --------------------------------------------------------------------------------------------


def plot_learning_curves(
    results: Sequence[SimulationResult],
    path: str | os.PathLike[str],
    metric: str = "micro_f1",
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Overlay the learning curves (``metric`` vs train size) of several runs in one PNG (atomic write).
    Runs with the same label (mode/strategy) over several seeds are drawn as mean ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from molal.io import atomic_write_with

    if not results:
        raise ValueError("no results to plot")
    groups: dict[str, list[SimulationResult]] = {}
    for i, r in enumerate(results):
        lab = labels[i] if labels is not None else f"{r.config['mode']}/{r.config['strategy']}"
        groups.setdefault(lab, []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for lab, runs in groups.items():
        n_r = min(len(r.records) for r in runs)
        x = np.asarray([runs[0].records[j]["train_size"] for j in range(n_r)])
        ys = np.asarray([[r.records[j][metric] for j in range(n_r)] for r in runs])
        m = ys.mean(0)
        ax.plot(x, m, marker="o", ms=3, label=f"{lab} (n={len(runs)})" if len(runs) > 1 else lab)
        if len(runs) > 1:
            s = ys.std(0)
            ax.fill_between(x, m - s, m + s, alpha=0.15)
    ax.set_xlabel("labelled items (train size)")
    ax.set_ylabel(metric.replace("_", "-"))
    ax.set_title(title or f"molal simulate — {results[0].config.get('dataset', '')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png"), mode=0o644)
    finally:
        plt.close(fig)
