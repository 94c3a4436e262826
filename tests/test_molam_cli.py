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


def test_certify_end_to_end(tmp_path, trec_outputs, trec_gold):
    """`molal molam certify` over recorded outputs: a table per confidence, the JSON with every draw's record;
    the naive rule's realised error is measured against gold like the certificate's."""
    n = 1500
    sub = trec_outputs.subset(np.arange(n))
    sub.save(tmp_path / "o.npz")
    labels = tmp_path / "gold.jsonl"
    labels.write_text("".join(json.dumps({"index": i, "label": sub.class_names[trec_gold[i]]}) + "\n"
                              for i in range(n)))
    out = tmp_path / "cert.json"
    r = CliRunner().invoke(app, ["molam", "certify", "--outputs", str(tmp_path / "o.npz"), "--labels", str(labels),
                                 "--draws", "2", "--audits", "2", "--audit-size", "200", "--epsilon", "0.1,0.2", "--json", str(out)],
                           env={"COLUMNS": "160"})
    assert r.exit_code == 0, r.output
    assert "ltt-pool" in r.output and "naive" in r.output and "coverage" in r.output
    d = json.loads(out.read_text())
    assert len(d["fits"]) == 2 and {s["rule"] for s in d["summary"]["served"]} == {"ltt-pool", "ltt-audit", "naive"}
    recs = [x for x in d["records"] if x["confidence"] == "served"]
    assert len(recs) == 2 * 2 * 2 * 3  # draws × audits × ε × rules
    for x in recs:
        if x["threshold"] is not None:
            assert 0 <= x["coverage"] <= 1 and 0 <= x["error"] <= 1
    naive = [x for x in recs if x["rule"] == "naive"]
    assert {x["threshold"] for x in naive} == {0.9, 0.8} and all(x["coverage"] > 0 for x in naive)


def test_certify_bad_input_clear_error(tmp_path, trec_outputs):
    sub = trec_outputs.subset(np.arange(300))
    sub.save(tmp_path / "o.npz")
    runner = CliRunner()
    r = runner.invoke(app, ["molam", "certify", "--outputs", str(tmp_path / "o.npz")])
    assert r.exit_code == 2 and "--labels is needed" in r.output
    for args, msg in ((["--epsilon", "0"], "must be in (0, 1)"), (["--epsilon", "x"], "comma-separated"),
                      (["--delta", "1.5"], "--delta must be in"), (["--audit-size", "6000"], "between 1 and")):
        r = runner.invoke(app, ["molam", "certify", *args], env={"COLUMNS": "200"})
        assert r.exit_code == 2 and msg in r.output, r.output
