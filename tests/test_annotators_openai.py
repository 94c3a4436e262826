"""OpenAI-compatible annotator over REAL HTTP against a local server backed by a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from molal.annotators import Mixture
from molal.annotators.base import AnnotatorError, AnnotatorUnavailable
from molal.annotators.openai_compat import OpenAIAnnotator, class_mass_from_top, label_logprob_from_echo
from molal.cache import AnnotationCache
from tests.conftest import free_port

from .llm_server import TinyLMServer, build_tiny_lm

TEXTS = ["Who wrote Hamlet ?", "Where is the city of Paris ?", "How many people live there ?"]
CLASSES = ["human", "location", "numeric"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import torch

    torch.set_num_threads(1)
    return build_tiny_lm(tmp_path_factory.mktemp("tiny") / "lm", seed=0)


@pytest.fixture(scope="module")
def server(model_dir: Path):
    with TinyLMServer(model_dir) as s:
        yield s


def test_echo_scoring_equals_full_label_logprob(server: TinyLMServer, model_dir: Path) -> None:
    import torch

    a = OpenAIAnnotator("c", server.base_url, "tiny-llama", api="completions", scoring="echo", prompts_per_request=4,
                        concurrency=2)
    found = a.check_server()  # the echo is verified first (once per process and server)
    assert found["echo_aligned"] and "prompts_per_request" not in found
    before = server.requests
    res = a.annotate(TEXTS, CLASSES)
    assert not res.failed and res.tokens and res.tokens > 0
    assert server.requests - before == 3  # 9 (text, class) prompts in batches of 4
    assert isinstance(server.bodies[-1]["prompt"], list) and server.bodies[-1]["echo"] is True
    tok, lm = server.tok, server.lm
    for i, t in enumerate(TEXTS):
        prompt = a.prompt.plain(t, CLASSES, {})
        ref = []
        for c in CLASSES:
            enc = tok(prompt + " " + c, add_special_tokens=False, return_offsets_mapping=True)
            ids = enc["input_ids"]
            with torch.inference_mode():
                lp = torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            ref.append(sum(float(lp[p - 1, ids[p]]) for p, (s, e) in enumerate(enc["offset_mapping"]) if e > len(prompt)))
        ref = np.exp(np.array(ref) - max(ref))
        np.testing.assert_allclose(res.probs[i], ref / ref.sum(), rtol=1e-4, atol=1e-7)


def test_chat_top_logprobs_and_consistency(server: TinyLMServer) -> None:
    import torch

    a = OpenAIAnnotator("q", server.base_url, "tiny-llama", api="chat", top_logprobs=50, samples=4, max_tokens=3, seed=1)
    res = a.annotate(TEXTS, CLASSES)
    assert not res.failed
    np.testing.assert_allclose(res.probs.sum(1), 1.0)
    for i, t in enumerate(TEXTS):  # reference: the model's own next-token top-50, mapped by the documented rule
        prompt = server.tok.apply_chat_template(a.prompt.messages(t, CLASSES, {}), add_generation_prompt=True, tokenize=False)
        ids = server.tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            lp = torch.log_softmax(server.lm(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        vals, idx = torch.topk(lp, 50)
        top: dict[str, float] = {}
        for v, j in zip(vals.tolist(), idx.tolist(), strict=True):
            top.setdefault(server.tok.decode([j]), v)
        mass = class_mass_from_top(top, CLASSES)
        np.testing.assert_allclose(res.probs[i], mass / mass.sum(), rtol=1e-4)
    assert res.consistency.shape == (3, 3) and (res.consistency <= 1).all()
    sampled = [b for b in server.bodies if b.get("n") == 4]
    assert sampled and sampled[-1]["temperature"] == 0.7 and sampled[-1]["top_p"] == 0.9 and sampled[-1]["seed"] == 1
    scored = [b for b in server.bodies if b.get("top_logprobs") == 50]
    assert scored and scored[-1]["max_tokens"] == 1 and scored[-1]["messages"][0]["role"] == "system"
    # completions API with first-token top logprobs works too
    c = OpenAIAnnotator("c", server.base_url, "tiny-llama", api="completions", scoring="top_logprobs", top_logprobs=50)
    rc = c.annotate(TEXTS, CLASSES)
    assert not rc.failed and np.allclose(rc.probs.sum(1), 1.0)


def test_class_mass_rules() -> None:
    top = {" hu": np.log(0.4), "l": np.log(0.2), "n": np.log(0.1), "\n": np.log(0.2), "xyz": np.log(0.1)}
    np.testing.assert_allclose(class_mass_from_top(top, ["human", "location", "numeric", "number"]), [0.4, 0.2, 0.05, 0.05])
    lp = {"tokens": ["Cat", ":", " hu", "man", "!"], "token_logprobs": [None, -1.0, -2.0, -0.5, -9.0], "text_offset": [0, 3, 4, 7, 10]}
    assert label_logprob_from_echo(lp, prompt_len=4, full_len=10) == -2.5


def test_retries_on_429_and_500_then_success(server: TinyLMServer) -> None:
    a = OpenAIAnnotator("c", server.base_url, "tiny-llama", api="completions", scoring="echo", backoff=0.01, max_retries=4, concurrency=1)
    a.check_server()
    server.fail_next(1, 429)
    server.fail_next(1, 500)
    before = server.requests
    res = a.annotate(TEXTS[:1], CLASSES)
    assert not res.failed and np.isfinite(res.probs).all()
    assert server.requests - before == 3  # 429, 500, then the real answer


def test_retries_exhausted_nothing_cached(server: TinyLMServer, tmp_path: Path) -> None:
    a = OpenAIAnnotator("c", server.base_url, "tiny-llama", api="completions", scoring="echo", backoff=0.01, max_retries=2, concurrency=1)
    a.check_server()
    server.fail_next(3, 503)
    with pytest.raises(AnnotatorError, match="HTTP 503.*gave up after 3 attempt"):
        a.annotate(TEXTS[:1], CLASSES)
    cache = AnnotationCache(tmp_path / "c.sqlite")
    server.fail_next(3, 503)
    res = Mixture([a]).annotate(TEXTS[:1], CLASSES, cache=cache)
    assert 0 in res.failed and "HTTP 503" in res.failed[0] and cache.count() == 0
    res = Mixture([a]).annotate(TEXTS[:1], CLASSES, cache=cache)  # the server is fine again: retried
    assert not res.failed and cache.count() == 1


def test_unreachable_server_clear_error_nothing_cached(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    a = OpenAIAnnotator("gone", url, "m", backoff=0.01, max_retries=2, timeout=2)
    with pytest.raises(AnnotatorUnavailable, match=r"cannot reach http://127\.0\.0\.1:\d+/v1 \(ConnectError"):
        a.annotate(TEXTS, CLASSES)
    cache = AnnotationCache(tmp_path / "c.sqlite")
    res = Mixture([a], ).annotate(TEXTS, CLASSES, cache=cache)
    assert sorted(res.failed) == [0, 1, 2] and all("cannot reach" in r for r in res.failed.values())
    assert len(res.done_idx) == 0 and cache.count() == 0


def test_api_key_from_env_sent_never_in_identity_or_errors(model_dir: Path, monkeypatch) -> None:
    secret = "sk-test-very-secret-1234"
    with TinyLMServer(model_dir, api_key=secret) as srv:
        monkeypatch.setenv("MOLAL_TEST_KEY", secret)
        a = OpenAIAnnotator("k", srv.base_url, "tiny-llama", api="completions", scoring="echo", api_key_env="MOLAL_TEST_KEY")
        assert not a.annotate(TEXTS[:1], CLASSES).failed
        assert srv.auth_headers[-1] == f"Bearer {secret}"
        assert secret not in repr(a.identity())
        monkeypatch.setenv("MOLAL_TEST_KEY", "sk-wrong-key-5678")
        b = OpenAIAnnotator("k", srv.base_url, "tiny-llama", api="completions", scoring="echo", api_key_env="MOLAL_TEST_KEY")
        with pytest.raises(AnnotatorUnavailable, match="refused the API key") as ei:
            b.annotate(TEXTS[:1], CLASSES)
        assert "sk-wrong-key-5678" not in str(ei.value) and secret not in str(ei.value)
        monkeypatch.delenv("MOLAL_TEST_KEY")
        with pytest.raises(AnnotatorUnavailable, match="MOLAL_TEST_KEY is not set"):
            OpenAIAnnotator("k", srv.base_url, "m", api_key_env="MOLAL_TEST_KEY").annotate(["x"], CLASSES)


def test_openai_from_config_and_bad_fields(server: TinyLMServer, tmp_path: Path) -> None:
    from molal.annotators import ConfigError

    p = tmp_path / "m.toml"
    p.write_text(f'[[annotator]]\ntype = "openai"\nname = "qwen"\nbase_url = "{server.base_url}"\nmodel = "tiny-llama"\n'
                 'api = "completions"\nscoring = "echo"\nsamples = 2\nmax_tokens = 2\n')
    mix = Mixture.from_config(p)
    res = mix.annotate(TEXTS[:2], CLASSES)
    assert len(res.done_idx) == 2 and res.outputs.consistency is not None
    p.write_text('[[annotator]]\ntype = "openai"\nname = "qwen"\nbase_url = "localhost:8000"\nmodel = "m"\n')
    with pytest.raises(ConfigError, match="m.toml: annotator #1 \\('qwen'\\): base_url must be an http"):
        Mixture.from_config(p)
    p.write_text('[[annotator]]\ntype = "openai"\nname = "qwen"\nbase_url = "http://x/v1"\nmodel = "m"\nscoring = "echo"\n')
    with pytest.raises(ConfigError, match="needs api='completions'"):
        Mixture.from_config(p)


def test_timeout_is_retried_then_bounded(model_dir: Path) -> None:
    import time

    with TinyLMServer(model_dir, delay_s=0.6) as slow:
        a = OpenAIAnnotator("s", slow.base_url, "tiny-llama", api="completions", scoring="echo", timeout=0.2, backoff=0.01, max_retries=10,
                            max_total_s=1.0, concurrency=1)
        t0 = time.monotonic()
        with pytest.raises(AnnotatorUnavailable, match="ReadTimeout.*gave up"):
            a.annotate(TEXTS[:1], CLASSES)
        assert time.monotonic() - t0 < 3.0  # bounded by max_total_s, not 10 retries x timeout... + slack
        assert slow.requests >= 2  # it did retry


def test_prompt_carries_descriptions_examples_verbalizers(server: TinyLMServer) -> None:
    a = OpenAIAnnotator(
        "fs", server.base_url, "tiny-llama", api="completions", scoring="echo",
        verbalizers={"numeric": "number"}, examples=[{"text": "Who is he ?", "label": "human"}],
    )
    res = a.annotate(TEXTS[:1], CLASSES, descriptions={"location": "a place"})
    assert not res.failed
    prompts = server.bodies[-1]["prompt"]
    assert any(p.endswith("Category: number") for p in prompts)
    assert all("Text: Who is he ?\nCategory: human" in p and "- location: a place" in p for p in prompts)
    with pytest.raises(ValueError, match="examples\\[0\\] has label 'sports'"):
        OpenAIAnnotator("x", server.base_url, "m", examples=[{"text": "t", "label": "sports"}]).annotate(["x"], CLASSES)


def test_mixture_queries_remote_annotators_concurrently(model_dir: Path, tmp_path: Path) -> None:
    with TinyLMServer(model_dir, delay_s=0.3) as s1, TinyLMServer(model_dir, delay_s=0.3) as s2:
        mix = Mixture([
            OpenAIAnnotator("a", s1.base_url, "tiny-llama", api="completions", scoring="echo", concurrency=1),
            OpenAIAnnotator("b", s2.base_url, "tiny-llama", api="completions", scoring="echo", concurrency=1),
        ])
        res = mix.annotate(TEXTS, CLASSES, cache=AnnotationCache(tmp_path / "c.sqlite"))
        assert len(res.done_idx) == 3 and not res.failed
        (a0, a1), (b0, b1) = s1.spans[0], s2.spans[0]
        assert a0 < b1 and b0 < a1, "the two servers' requests should overlap in time"


def test_walk_class_mass_follows_ambiguous_tokens() -> None:
    from molal.annotators.openai_compat import walk_class_mass

    ln = np.log
    toy = {  # a toy next-token table: prompt text -> {token: logprob}
        "P:": {" n": ln(0.6), " human": ln(0.3), " x": ln(0.1)},
        "P: n": {"umeric": ln(0.5), "umber": ln(0.2), "u": ln(0.2), "!": ln(0.1)},
        "P: nu": {"meric": ln(0.25), "mber": ln(0.75)},
    }
    asked = []

    def top(prefix: str) -> dict[str, float]:
        asked.append(prefix)
        return toy[prefix]

    mass = walk_class_mass(top, "P:", ["numeric", "number", "human"])
    np.testing.assert_allclose(mass, [0.6 * (0.5 + 0.2 * 0.25), 0.6 * (0.2 + 0.2 * 0.75), 0.3])
    assert asked == ["P:", "P: n", "P: nu"]
    # a class that ends where another continues keeps the mass that does not continue
    toy2 = {"Q:": {" yes": ln(0.8), " no": ln(0.2)}, "Q: yes": {"ter": ln(0.25), ".": ln(0.75)}}
    np.testing.assert_allclose(walk_class_mass(lambda p: toy2[p], "Q:", ["yes", "yesterday", "no"]), [0.6, 0.2, 0.2])
    toy3 = {"Q:": {" yes": ln(0.8), " no": ln(0.2)}, "Q: yes": {"terday": ln(0.5), "day": ln(0.25)}}
    np.testing.assert_allclose(walk_class_mass(lambda p: toy3[p], "Q:", ["yes", "yesterday", "no"]), [0.4, 0.4, 0.2])
    assert walk_class_mass(lambda p: {" human.": 0.0}, "R:", ["human", "location"]).tolist() == [1.0, 0.0]


def test_completions_top_logprobs_walks_multi_token_names_over_http(server: TinyLMServer) -> None:
    a = OpenAIAnnotator("w", server.base_url, "tiny-llama", api="completions", scoring="top_logprobs",
                        top_logprobs=100, concurrency=1)
    classes = ["numeric", "number", "human"]
    before = server.requests
    res = a.annotate(TEXTS, classes)
    assert not res.failed and np.allclose(res.probs.sum(1), 1.0)
    assert server.requests - before > len(TEXTS)  # ambiguous first tokens were followed with more requests
    followed = [b["prompt"] for b in server.bodies[-(server.requests - before):] if isinstance(b.get("prompt"), str)]
    bases = [a.prompt.plain(t, classes, {}) for t in TEXTS]
    assert any(p.startswith(b) and len(p) > len(b) for p in followed for b in bases), followed[:4]


def test_deadline_caps_requests_rows_pending_not_failed(model_dir: Path, tmp_path: Path) -> None:
    import time

    cache = AnnotationCache(tmp_path / "c.sqlite")
    with TinyLMServer(model_dir, delay_s=2.0) as slow:
        a = OpenAIAnnotator("s", slow.base_url, "tiny-llama", api="completions", scoring="echo", timeout=30, max_retries=5)
        t0 = time.monotonic()
        res = Mixture([a]).annotate(TEXTS, CLASSES, cache=cache, deadline=t0 + 0.5)
        took = time.monotonic() - t0
        assert took < 1.9, took  # the 30 s request timeout was capped by the deadline (server answers after 2 s)
        assert len(res.done_idx) == 0 and not res.failed and res.pending_idx.tolist() == [0, 1, 2]
        assert res.stats["deadline_reached"] and cache.count() == 0
