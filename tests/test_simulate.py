"""The human-free AL loop: tiny end-to-end runs through the CLI and the library (tiny random encoder)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from molal.cli.main import app
from molal.simulate import SimulationConfig, SimulationResult, load_simulation_data, run_simulation
from tests.test_student import make_tiny_encoder

torch.set_num_threads(1)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> str:
    return str(make_tiny_encoder(tmp_path_factory.mktemp("tiny-bert-sim")))


def _tiny_args(enc: str) -> list[str]:
    return [
        "--rounds", "2", "--budget", "10", "--initial", "12", "--pool-limit", "300", "--test-limit", "60",
        "--encoder", enc, "--epochs", "1", "--min-steps", "0", "--batch-size", "16", "--max-length", "32", "--lr", "1e-3",
        "--device", "cpu", "--no-progress",
    ]


def test_cli_oracle_end_to_end(tiny_encoder, tmp_path, shared_data):
    out = tmp_path / "oracle.json"
    r = CliRunner().invoke(
        app, ["simulate", "--mode", "oracle", "--strategy", "coreset", "--out", str(out), *_tiny_args(tiny_encoder)]
    )
    assert r.exit_code == 0, r.output
    assert "micro-F1" in r.output and "wrote" in r.output
    res = json.loads(out.read_text())
    assert res["format"] == "molal.SimulationResult" and res["format_version"] == 1
    recs = res["records"]
    assert [x["round"] for x in recs] == [0, 1, 2]
    assert [x["train_size"] for x in recs] == [12, 22, 32]
    assert recs[0]["batch_label_acc"] is None
    assert all(x["batch_label_acc"] == 1.0 for x in recs[1:])  # ORACLE labels are gold
    assert all(x["n_human"] == x["train_size"] for x in recs)
    assert all(0.0 <= x["micro_f1"] <= 1.0 and 0.0 <= x["macro_f1"] <= 1.0 for x in recs)
    assert any("test: " in n and "trec/test.jsonl" in n for n in res["notes"])
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_cli_molam_mode_and_overlay_plot(tiny_encoder, tmp_path, shared_data):
    runner = CliRunner()
    a = tmp_path / "molam.json"
    r = runner.invoke(
        app, ["simulate", "--mode", "molam", "--strategy", "entropy", "--out", str(a), *_tiny_args(tiny_encoder)]
    )
    assert r.exit_code == 0, r.output
    res = SimulationResult.load(a)
    recs = res.records
    assert [x["n_human"] for x in recs] == [12, 12, 12]  # only the seeds are gold
    assert [x["n_llm_labeled"] for x in recs] == [0, 10, 20]
    # MoLAM labels on TREC are good but not perfect; the batch accuracy is the real agreement with gold
    accs = [x["batch_label_acc"] for x in recs[1:]]
    assert all(0.3 <= acc <= 1.0 for acc in accs)
    assert res.metadata["labeller"]["type"] == "MoLAM"
    b = tmp_path / "hybrid.json"
    r = runner.invoke(
        app,
        ["simulate", "--mode", "hybrid", "--human-per-round", "4", "--strategy", "random", "--out", str(b),
         "--overlay", str(a), *_tiny_args(tiny_encoder)],
    )
    assert r.exit_code == 0, r.output
    hyb = SimulationResult.load(b).records
    assert [x["n_human"] for x in hyb] == [12, 16, 20]
    png = tmp_path / "both.png"
    r = runner.invoke(app, ["simulate", "plot", str(a), str(b), "--out", str(png), "--metric", "macro_f1"])
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_cli_certified_labels_only_reach_the_student_unreviewed(tiny_encoder, tmp_path, shared_data):
    """--certify-epsilon: the served loop's auto_label. A random audit (held out) certifies MoLAM's threshold;
    queried items below it go to people. A loose ε certifies most of the pool: MoLAM labels the batches; an ε
    the audit cannot certify sends every queried item to people, and says why."""
    runner = CliRunner()
    got = {}
    for eps in ("0.9", "0.01"):
        out = tmp_path / f"cert-{eps}.json"
        r = runner.invoke(app, ["simulate", "--mode", "molam", "--strategy", "random", "--certify-epsilon", eps,
                                "--audit", "150", "--out", str(out), *_tiny_args(tiny_encoder)])
        assert r.exit_code == 0, r.output
        assert f"certificate at ε = {eps}" in r.output
        got[eps] = SimulationResult.load(out)
    loose, strict = got["0.9"], got["0.01"]
    cert = loose.metadata["labeller"]["certificate"]
    assert cert["threshold"] is not None and cert["coverage"] > 0.5 and cert["audit"] == 150
    assert [x["n_llm_labeled"] + x["n_human"] for x in loose.records] == [12, 22, 32]
    assert loose.records[-1]["n_llm_labeled"] > 0
    cert = strict.metadata["labeller"]["certificate"]
    assert cert["threshold"] is None and cert["reason"]
    assert [(x["n_llm_labeled"], x["n_human"]) for x in strict.records] == [(0, 12), (0, 22), (0, 32)]
    assert strict.metadata["human_labels"] == {"training": 32, "audit": 150}
    # the audit is held out: 300 items - 12 seeds - 150 audit leaves 138 to query; asking for more fails
    r = runner.invoke(app, ["simulate", "--certify-epsilon", "0.1", "--audit", "288", *_tiny_args(tiny_encoder)])
    assert r.exit_code == 2 and "audit (288) must be smaller" in r.output
    r = runner.invoke(app, ["simulate", "--mode", "oracle", "--certify-epsilon", "0.1", *_tiny_args(tiny_encoder)])
    assert r.exit_code != 0 and "molam and hybrid modes" in r.output


def test_cli_molam_text_features(tiny_encoder, tmp_path, shared_data):
    """--molam-text-features: MoLAM's text model on the pool's embeddings (the tiny encoder here)."""
    out = tmp_path / "molam-text.json"
    r = CliRunner().invoke(
        app, ["simulate", "--mode", "molam", "--strategy", "random", "--molam-text-features", tiny_encoder,
              "--out", str(out), *_tiny_args(tiny_encoder)]
    )
    assert r.exit_code == 0, r.output
    res = SimulationResult.load(out)
    assert res.config["molam_text_features"] == tiny_encoder
    assert res.label == "molam+text/random/seed0"
    lab = res.metadata["labeller"]
    assert lab["type"] == "MoLAM" and lab["text"]["encoder"] == tiny_encoder
    assert 0.3 <= lab["label_acc_on_non_seed_pool"] <= 1.0
    assert [x["n_llm_labeled"] for x in res.records] == [0, 10, 20]
    with pytest.raises(ValueError, match="molam_text_features"):
        SimulationConfig(molam_text_features=" ").validate()


def test_cli_bad_input(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["simulate", "--strategy", "bogus", "--out", str(tmp_path / "x.json")])
    assert r.exit_code != 0
    assert "valid: random, entropy" in r.output
    r = runner.invoke(app, ["simulate", "--mode", "psychic", "--out", str(tmp_path / "x.json")])
    assert r.exit_code != 0 and "valid: molam, oracle" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    r = runner.invoke(app, ["simulate", "plot", str(bad)])
    # click's error box wraps at 80 columns wherever the path puts it: compare the words
    words = " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.output).split())
    assert r.exit_code != 0 and "not a molal simulation result" in words, r.output


def test_holdout_when_no_test_split(tmp_path, trec_outputs, trec_gold):
    idx = np.arange(400)
    pool = trec_outputs.subset(idx)
    npz = tmp_path / "pool.npz"
    pool.save(npz)
    labels = tmp_path / "labels.jsonl"
    names = trec_outputs.class_names
    labels.write_text("".join(json.dumps({"text": t, "label": names[y]}) + "\n" for t, y in zip(pool.texts, trec_gold[idx], strict=True)))
    cfg = SimulationConfig(dataset="no-such-dataset", annotations=str(npz), pool_labels=str(labels), rounds=1, budget=5, n_initial=10)
    data = load_simulation_data(cfg)
    assert len(data.test_texts) == 40 and data.outputs.n_items == 360
    assert any("held out a fixed 10%" in n for n in data.notes)
    # the held-out part is fixed (independent of the run seed)
    data2 = load_simulation_data(SimulationConfig(**{**cfg.__dict__, "seed": 5}))
    assert data2.test_texts == data.test_texts
    with pytest.raises(Exception, match="pool-labels"):
        load_simulation_data(SimulationConfig(annotations=str(npz)))


def test_library_loss_inputs_follow_the_paper(tiny_encoder, shared_data):
    """In MoLAM mode the loss gets negatives only on LLM-labelled items and down-weights disagreements."""
    cfg = SimulationConfig(
        mode="molam", strategy="margin", rounds=2, budget=15, n_initial=10, pool_limit=300, test_limit=40,
        encoder=tiny_encoder, epochs=1, min_steps=0, max_length=32, lr=1e-3, device="cpu", progress=False,
    )
    res = run_simulation(cfg)
    r0, r1, r2 = res.records
    assert r0["n_with_negatives"] == 0 and r0["n_downweighted"] == 0  # seeds: human labels only
    assert 0 < r2["n_with_negatives"] <= r2["n_llm_labeled"]
    assert r2["n_downweighted"] <= r2["n_llm_labeled"]


def test_bundled_asset_pool_without_shared_data(monkeypatch, tmp_path):
    monkeypatch.setenv("MOLAL_SHARED_DATA", str(tmp_path / "nowhere"))
    data = load_simulation_data(SimulationConfig())
    assert data.outputs.n_items + len(data.test_texts) == 5452
    assert len(data.test_texts) == 545
    assert any("trec_recorded.npz" in n for n in data.notes)
    assert any("held out a fixed 10%" in n for n in data.notes)
    assert data.outputs.texts is not None and len(set(data.gold.tolist())) == 6
