"""`molal molam fit` / `molal molam eval` end to end on a small file."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from molal.cli.main import app


def test_fit_eval_end_to_end(tmp_path, trec_outputs, trec_gold):
    n = 800
    sub = trec_outputs.subset(np.arange(n))
    sub.save(tmp_path / "outputs.npz")
    names = sub.class_names
    rng = np.random.default_rng(0)
    idx = rng.choice(n, 40, replace=False)
    seeds = tmp_path / "seeds.jsonl"
    # half given by index, half by text
    lines = [{"index": int(i), "label": names[trec_gold[i]]} for i in idx[:20]]
    lines += [{"text": sub.texts[i], "label": names[trec_gold[i]]} for i in idx[20:]]
    seeds.write_text("".join(json.dumps(r) + "\n" for r in lines))
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"index": i, "label": names[trec_gold[i]]}) + "\n" for i in range(n)))
    runner = CliRunner()
    model = tmp_path / "molam.json"
    r = runner.invoke(app, ["molam", "fit", "--outputs", str(tmp_path / "outputs.npz"), "--seeds", str(seeds),
                            "--out", str(model)])
    assert r.exit_code == 0, r.output
    d = json.loads(model.read_text())
    assert d["kind"] == "molam" and d["metadata"]["n_seeds"] == 40
    out_dir = tmp_path / "ev"
    r = runner.invoke(app, ["molam", "eval", "--model", str(model), "--outputs", str(tmp_path / "outputs.npz"),
                            "--labels", str(labels), "--seeds", str(seeds), "--out-dir", str(out_dir)])
    assert r.exit_code == 0, r.output
    rep = json.loads((out_dir / "report.json").read_text())
    assert rep["eval"]["n"] == n - 40
    assert 0.6 < rep["eval"]["accuracy"] <= 1 and 0 <= rep["eval"]["ece"] <= 1
    assert set(rep["per_llm"]) == set(sub.llm_names) and "seed_accuracy" in rep["per_llm"]["yi"]
    for png in ("reliability.png", "confusion_per_llm.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a baseline through the same command
    r = runner.invoke(app, ["molam", "fit", "--outputs", str(tmp_path / "outputs.npz"), "--seeds", str(seeds),
                            "--out", str(tmp_path / "mv.json"), "--method", "majority_vote"])
    assert r.exit_code == 0, r.output


def test_fit_bad_seeds_clear_error(tmp_path, trec_outputs):
    sub = trec_outputs.subset(np.arange(100))
    sub.save(tmp_path / "o.npz")
    bad = tmp_path / "s.jsonl"
    bad.write_text(json.dumps({"index": 3, "label": "animal"}) + "\n")
    r = CliRunner().invoke(app, ["molam", "fit", "--outputs", str(tmp_path / "o.npz"), "--seeds", str(bad),
                                 "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 2 and "not one of the classes" in r.output
    bad.write_text(json.dumps({"index": 1000, "label": "human"}) + "\n")
    r = CliRunner().invoke(app, ["molam", "fit", "--outputs", str(tmp_path / "o.npz"), "--seeds", str(bad),
                                 "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 2 and "not a row" in r.output
    assert not (tmp_path / "m.json").exists()
