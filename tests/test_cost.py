"""Know the cost before paying it (issue 16): molal.annotators.cost against a real HTTP server (the tiny
Llama of tests/llm_server.py), the CLI's --estimate / --max-usd, and the backend's job refusing a pool
above MOLAL_MAX_ANNOTATE_USD before any text goes to a paid API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from molal.annotators import Mixture
from molal.annotators.cost import approx_tokens, estimate
from molal.annotators.openai_compat import OpenAIAnnotator
from molal.cache import AnnotationCache

from .llm_server import TinyLMServer, build_tiny_lm

CLASSES = ["human", "location", "numeric"]
TEXTS = [f"Who wrote book number {i} ?" for i in range(12)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    with TinyLMServer(build_tiny_lm(tmp_path_factory.mktemp("tiny") / "lm", seed=0)) as s:
        yield s


def paid(server, **kw) -> OpenAIAnnotator:
    return OpenAIAnnotator("paid", server.base_url, "tiny-llama", api="chat", top_logprobs=50, concurrency=1,
                           usd_per_mtok_prompt=2.0, usd_per_mtok_completion=8.0, **kw)


def test_estimate_counts_only_uncached_texts_and_prices_them(server, tmp_path: Path) -> None:
    a = paid(server)
    mix = Mixture([a])
    cache = AnnotationCache(tmp_path / "c.sqlite")
    mix.annotate(TEXTS[:4], CLASSES, cache=cache)  # 4 texts are paid for already
    before = server.requests
    est = estimate(mix, TEXTS + TEXTS[:2], CLASSES, cache=cache)  # duplicates count once
    assert server.requests == before  # an estimate without a sample sends nothing
    c = est.annotators[0]
    assert est.n_texts == 12 and c.texts_to_annotate == 8 and c.requests == 8 and not c.tokens_exact
    want = sum(approx_tokens("\n".join(m["content"] for m in a.prompt.messages(t, CLASSES, {}))) + 8 for t in TEXTS[4:])
    assert c.prompt_tokens == want and c.completion_tokens == 8
    assert est.usd == pytest.approx((want * 2.0 + 8 * 8.0) / 1e6)
    assert est.over_budget(max_usd=1.0) is None
    assert "above the budget of $1e-05" in est.over_budget(max_usd=0.00001)


def test_sampled_estimate_times_and_caches_the_sample(server, tmp_path: Path) -> None:
    mix = Mixture([paid(server, samples=2, max_tokens=3)])
    cache = AnnotationCache(tmp_path / "c.sqlite")
    est = estimate(mix, TEXTS, CLASSES, cache=cache, sample=3)
    c = est.annotators[0]
    assert est.sampled == 3 and cache.count() == 3 and c.texts_to_annotate == 9
    assert c.requests == 18 and c.completion_tokens == 9 * (1 + 2 * 3)  # scoring + n=2 answers of 3 tokens
    assert c.seconds_per_text > 0 and c.seconds == pytest.approx(c.seconds_per_text * 9)
    assert est.over_budget(max_hours=1e-9).startswith("annotating 12 texts is estimated at")


def test_unpriced_paid_api_cannot_be_held_to_a_money_budget(server) -> None:
    mix = Mixture([OpenAIAnnotator("free?", server.base_url, "tiny-llama", api="chat")])
    est = estimate(mix, TEXTS, CLASSES)
    assert est.unpriced == ["free?"] and "no price configured" in est.over_budget(max_usd=100)
    assert est.over_budget() is None


def test_hf_tokens_are_exact(tmp_path_factory) -> None:
    from molal.annotators.hf import HFAnnotator

    a = HFAnnotator("tiny", str(build_tiny_lm(tmp_path_factory.mktemp("t2") / "lm", seed=1)), chat=False)
    est = estimate(Mixture([a]), TEXTS[:3], CLASSES)
    c = est.annotators[0]
    labels = a.label_ids(CLASSES)
    full = a.scoring_mode(labels) == "full"
    want = sum(len(a.prompt_ids(t, CLASSES, {})) for t in TEXTS[:3]) + (3 * sum(map(len, labels)) if full else 0)
    assert c.tokens_exact and c.prompt_tokens == want and not c.billed and est.usd == 0.0


def test_cli_estimate_and_budget(server, tmp_path: Path) -> None:
    data = tmp_path / "pool.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    cfg = tmp_path / "mix.toml"
    cfg.write_text(f'[[annotator]]\ntype = "openai"\nname = "paid"\nbase_url = "{server.base_url}"\nmodel = "tiny-llama"\n'
                   'top_logprobs = 50\nusd_per_mtok_prompt = 2.0\nusd_per_mtok_completion = 8.0\n')
    base = [sys.executable, "-m", "molal.cli.main", "annotate", "--data", str(data), "--config", str(cfg),
            "--labels", ",".join(CLASSES), "--out", str(tmp_path / "o.npz"), "--no-progress"]
    env = {**os.environ, "MODEL_DIR": str(tmp_path / "md"), "COLUMNS": "200"}
    r = subprocess.run([*base, "--estimate", "--sample", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "estimate for 12 texts (timed on 2)" in r.stderr and "total: $" in r.stderr
    assert not (tmp_path / "o.npz").exists()
    r = subprocess.run([*base, "--max-usd", "0.000001"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "over budget" in r.stderr and not (tmp_path / "o.npz").exists()
    r = subprocess.run([*base, "--max-usd", "5"], capture_output=True, text=True, env=env, timeout=120)
    # within budget: annotated (the random tiny model leaves some rows without a class: exit 1 lists them)
    assert r.returncode in (0, 1) and "over budget" not in r.stderr and (tmp_path / "o.npz").exists()


def test_training_job_refuses_a_pool_above_the_budget(server, tmp_path: Path) -> None:
    from molal.config import get_settings
    from molal.service.labelconfig import parse_label_config
    from molal.service.pipeline import Service
    from molal.service.train import Pool, TrainingError, fit_round

    config = ('<View><Text name="text" value="$text"/><Choices name="label" toName="text">'
              + "".join(f'<Choice value="{c}"/>' for c in CLASSES) + "</Choices></View>")
    svc = Service(get_settings(model_dir=tmp_path / "state", device="cpu", max_annotate_usd=0.000001))
    state = svc.store.project(9)
    cfg = tmp_path / "mix.toml"
    cfg.write_text(f'[[annotator]]\ntype = "openai"\nname = "paid"\nbase_url = "{server.base_url}"\n'
                   'model = "tiny-llama"\nusd_per_mtok_prompt = 2.0\n')
    state.set_setting("mixture", str(cfg))
    pool = Pool(task_ids=list(range(len(TEXTS))), texts=TEXTS, data=[{"text": t} for t in TEXTS],
                human={0: 0, 1: 1, 2: 2}, prediction_versions=[[] for _ in TEXTS])
    before = server.requests
    with pytest.raises(TrainingError, match=r"estimated at \$.*above the budget of \$1e-06.*MOLAL_MAX_ANNOTATE_USD"):
        fit_round(svc, state, parse_label_config(config), pool, None)
    assert server.requests == before  # nothing was sent
    assert np.isfinite(est_usd(svc, state, config))


def est_usd(svc, state, config) -> float:
    from molal.service.labelconfig import parse_label_config

    mix = svc.mixture_for(state, parse_label_config(config).classes, TEXTS)
    return estimate(mix, TEXTS, CLASSES).usd
