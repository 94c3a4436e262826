"""molal.learner: the one round both loops run. Unit tests of its pieces, and the parity test: one round
through ``molal simulate``'s path and through the Label Studio training job's path on the same data and
seeds gives the same training set, weights, negatives and query."""

from __future__ import annotations

import json

import numpy as np
import pytest

from molal.learner import Learner, MachineLabel, Query, StoppingRule, TrainingSet, cohen_kappa
from tests.conftest import TREC_CLASSES, TREC_CONFIG


class FixedStudent:
    """What the learner needs of a student, with predictions given by a table (row text -> class)."""

    def __init__(self, table: dict[str, int], k: int = 3) -> None:
        self.table, self.class_names, self.fits = table, [f"c{i}" for i in range(k)], []

    def fit(self, texts, y, **kw):
        self.fits.append({"texts": list(texts), "y": np.asarray(y).tolist(), **kw})
        return self

    def predict(self, texts):
        return np.array([self.table.get(t, 0) for t in texts])


def test_training_set_keeps_insertion_order_and_people_override_the_machine():
    ts = TrainingSet()
    ts.add_human(5, 1)
    ts.add_machine(2, MachineLabel(0, 0.5, (1,), 0))
    ts.add_machine(9, MachineLabel(2, 1.0, (), 0))
    ts.add_human(2, 2)  # a person corrected the machine's label
    assert ts.rows() == [5, 2, 9] and len(ts) == 3 and 2 in ts and 3 not in ts
    d = Learner().round_data(ts, 3)
    assert d.rows.tolist() == [5, 2, 9] and d.y.tolist() == [1, 2, 2]
    assert d.is_human.tolist() == [True, True, False] and d.weights.tolist() == [1.0, 1.0, 1.0]
    assert d.negatives.any(1).tolist() == [False, False, False]


def test_weights_at_add_are_kept_each_round_are_recomputed():
    ts = TrainingSet(human={0: 1})
    ts.add_machine(1, MachineLabel(2, 0.5, (0,), 0))  # the querying student disagreed: α
    ts.prev_pred = {1: 2}  # ... but the last round's student agrees
    at_add = Learner(weights="at_add").round_data(ts, 3)
    each = Learner(weights="each_round").round_data(ts, 3)
    assert at_add.weights.tolist() == [1.0, 0.5] and each.weights.tolist() == [1.0, 1.0]
    assert at_add.negatives.tolist() == [[False, False, False], [True, False, False]]
    ce = Learner(loss="ce").round_data(ts, 3)
    assert ce.weights.tolist() == [1.0, 1.0] and not ce.negatives.any()


def test_round_offset_is_the_papers_lambda_numbering():
    student = FixedStudent({})
    ts = TrainingSet(human={0: 0, 1: 1})
    Learner().fit(student, ["a", "b"], ts, 0)
    Learner(round_offset=0).fit(student, ["a", "b"], ts, 0)
    assert [f["round_t"] for f in student.fits] == [1, 0]  # λ 0.46 (MoLLIA's seed round is round 1) vs 0.4


def test_query_split_and_labels_follow_the_strategy_order():
    texts = [f"t{i}" for i in range(10)]
    student = FixedStudent({"t3": 2, "t4": 1})
    ts = TrainingSet(human={0: 0, 1: 1})
    probs = np.full((10, 3), 1 / 3)
    probs[:, 0] = np.linspace(0.4, 0.9, 10)  # confidence grows with the row
    probs[:, 1] = probs[:, 2] = (1 - probs[:, 0]) / 2
    neg = np.zeros((10, 3), dtype=bool)
    neg[:, 2] = True
    learner = Learner("random", budget=4, human_per_round=2)
    q = learner.query(student, texts, ts, probs, np.random.default_rng(0))
    assert len(q.rows) == 4 and not set(q.rows) & {0, 1}
    assert sorted(q.to_human) == sorted(q.rows, key=lambda r: probs[r, 0])[:2]  # least confident go to people
    assert q.to_human == sorted(q.to_human, key=lambda r: probs[r, 0])
    added = learner.label_batch(ts, q, probs, neg, round_t=3)
    assert added == q.to_machine and all(ts.machine[r].label == 0 for r in added)
    assert all(ts.machine[r].weight == (0.5 if q.pred[r] != 0 else 1.0) for r in added)
    assert all(ts.machine[r].negatives == (2,) and ts.machine[r].round == 3 for r in added)
    assert ts.rows()[2:] == q.to_machine  # the people's rows wait for them
    # with a simulated person their rows join in the strategy's order
    ts2 = TrainingSet(human={0: 0, 1: 1})
    learner.label_batch(ts2, q, probs, neg, 3, human={r: 1 for r in q.to_human})
    assert ts2.rows()[2:] == q.rows and all(ts2.human[r] == 1 for r in q.to_human)
    assert learner.query(student, texts[:2], ts, probs, np.random.default_rng(0)) == Query([], [], [])


def test_bad_parameters_are_refused():
    for kw, words in ((dict(strategy="nope"), "nope"), (dict(budget=0), "budget"),
                      (dict(budget=3, human_per_round=4), "human_per_round"), (dict(alpha=2), "alpha"),
                      (dict(weights="never"), "weights"), (dict(round_offset=-1), "round_offset"),
                      (dict(loss="l2"), "loss"), (dict(budget=5, candidates=4), "candidates")):
        with pytest.raises(ValueError, match=words):
            Learner(**kw)


def test_kappa_and_the_stopping_rule():
    a = np.array([0, 1, 2, 0, 1, 2])
    assert cohen_kappa(a, a, 3) == 1.0 and cohen_kappa(np.zeros(4), np.zeros(4), 3) == 1.0
    assert cohen_kappa(a, np.array([1, 2, 0, 1, 2, 0]), 3) < 0
    rule = StoppingRule(kappa=0.95, window=2)
    assert not rule.check([None, 0.97]) and rule.check([None, 0.8, 0.96, 0.99]) and not rule.check([None, 0.99, 0.9])
    s1, s2 = rule.stop_set(5000, seed=3), rule.stop_set(5000, seed=3)
    assert len(s1) == 1000 and (s1 == s2).all() and (np.diff(s1) > 0).all()


# -- parity: the simulated and the served loop run the same round --------------------------------------------------
def test_one_round_is_the_same_in_simulate_and_in_the_training_job(tmp_path, monkeypatch):
    """The same 160 TREC questions with their recorded LLM answers, the same 20 seeds, the same MoLAM
    candidates, student settings and strategy: ``molal simulate`` (rounds=1) and two training jobs of a
    project in the human-free loop call the learner with the same training sets and query the same rows."""
    from molal.config import get_settings
    from molal.data import LLMOutputs
    from molal.resources import asset_path
    from molal.service.labelconfig import parse_label_config
    from molal.service.pipeline import Service
    from molal.service.train import Pool, fit_round
    from molal.simulate import SimulationConfig, SimulationData, run_simulation

    calls: dict[str, list] = {"fit": [], "query": []}
    real_fit, real_query = Learner.fit, Learner.query

    def spy_fit(self, student, texts, ts, round_t, **kw):
        d = real_fit(self, student, texts, ts, round_t, **kw)
        calls["fit"].append({"texts": [texts[r] for r in d.rows], "y": d.y.tolist(), "w": d.weights.tolist(),
                             "neg": d.negatives.tolist(), "human": d.is_human.tolist(), "lambda_t": self.lambda_round(round_t)})
        return d

    def spy_query(self, student, texts, ts, machine_probs, rng, **kw):
        q = real_query(self, student, texts, ts, machine_probs, rng, **kw)
        calls["query"].append({"rows": [texts[r] for r in q.rows], "to_human": [texts[r] for r in q.to_human]})
        return q

    monkeypatch.setattr(Learner, "fit", spy_fit)
    monkeypatch.setattr(Learner, "query", spy_query)

    n = 160
    with open(asset_path("trec.jsonl")) as fh:
        rows = [json.loads(line) for _, line in zip(range(n), fh, strict=False)]
    texts = [r["text"] for r in rows]
    gold = np.array([TREC_CLASSES.index(r["label"]) for r in rows])
    out = LLMOutputs.load(asset_path("trec_recorded.npz")).subset(np.arange(n))
    out.texts = texts
    data = SimulationData(out, gold, texts[:5], gold[:5], [])
    student = dict(epochs=1, max_length=32, freeze_encoder=True)
    cfg = SimulationConfig(mode="hybrid", strategy="entropy", rounds=1, budget=8, human_per_round=2, n_initial=20,
                           seed=0, molam_candidates="ds,best_single", min_steps=0, batch_size=16, lr=5e-5,
                           device="cpu", progress=False, stop_set=0, **student)
    sim = run_simulation(cfg, data)
    seeds = sim.metadata["seeds"]
    sim_calls, calls = calls, {"fit": [], "query": []}

    svc = Service(get_settings(model_dir=tmp_path / "state", student_epochs=1, student_max_length=32,
                               student_freeze_encoder=True, student_lr=5e-5, device="cpu"))
    state = svc.store.project(3)
    for k, v in {"loop_mode": "human_free", "strategy": "entropy", "query_batch": 8, "human_per_round": 2,
                 "molam_candidates": "ds,best_single"}.items():
        state.set_setting(k, v)
    pool = Pool(task_ids=list(range(1, n + 1)), texts=texts, data=[{"text": t} for t in texts],
                human={int(i): int(gold[i]) for i in seeds}, prediction_versions=[[] for _ in texts])
    spec = parse_label_config(TREC_CONFIG)
    r1 = fit_round(svc, state, spec, pool, None, job_id="p1")
    for r in r1.to_human:  # the people label what the round sent them (here: gold, as simulate's person)
        pool.human[r] = int(gold[r])
    fit_round(svc, state, spec, pool, None, job_id="p2")

    assert len(sim_calls["fit"]) == len(calls["fit"][:2]) == 2
    assert sim_calls["query"][0] == calls["query"][0]
    assert len(calls["query"][0]["rows"]) == 8 and len(calls["query"][0]["to_human"]) == 2
    for a, b in zip(sim_calls["fit"], calls["fit"][:2], strict=True):
        assert a["lambda_t"] == b["lambda_t"]
        # the same rows with the same labels, weights, negatives and human flags; the order may differ (the
        # job lists people's labels first: it cannot know in which order they were given)
        assert sorted(zip(a["texts"], a["y"], a["w"], a["neg"], a["human"], strict=True)) == \
            sorted(zip(b["texts"], b["y"], b["w"], b["neg"], b["human"], strict=True))
    assert sim_calls["fit"][0] == calls["fit"][0]  # round 0: the seeds, in the same order here
    assert sum(not h for h in calls["fit"][1]["human"]) == 6  # the 6 machine-labelled rows, with weights/negatives


# -- the service's arrows point one way ----------------------------------------------------------------------------
def test_service_modules_never_import_the_service_from_below():
    """molal/service: the Service (pipeline.py) sits on top; the runtime, the jobs and handlers below it take a
    Runtime and import neither pipeline.py nor each other upwards (no lazy imports holding a circle together)."""
    import ast
    from pathlib import Path

    import molal.service

    root = Path(molal.service.__file__).parent
    below = {"molal.service.pipeline"}
    rules = {  # module -> molal.service modules it must not import (at any depth, TYPE_CHECKING included)
        "runtime": below | {"molal.service.predict", "molal.service.train"},
        "predict": below | {"molal.service.train"},
        "train": below,
        "jobs": below | {"molal.service.runtime", "molal.service.train", "molal.service.predict"},
        "store": below | {"molal.service.runtime", "molal.service.jobs"},
        "taskdata": below | {"molal.service.runtime"},
        "lstrust": below | {"molal.service.runtime", "molal.service.jobs"},
        "lsclient": below | {"molal.service.runtime"},
        "labelconfig": below | {"molal.service.runtime", "molal.service.store"},
        "queue": below | {"molal.service.train", "molal.service.predict"},
        "review": below | {"molal.service.runtime", "molal.service.train", "molal.service.queue"},
        "status": below | {"molal.service.train", "molal.service.predict"},
    }
    for mod, banned in rules.items():
        tree = ast.parse((root / f"{mod}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        assert not imported & banned, (mod, imported & banned)
