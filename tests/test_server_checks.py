"""OpenAI-compatible servers checked before molal trusts them (issue 16): a misaligned echo, a server that
takes one prompt per request, one without logprobs — each found by :meth:`OpenAIAnnotator.check_server`
with an error naming the feature, never silent garbage. Over real HTTP against the tiny-Llama server of
``tests/llm_server.py``, which reproduces each fault; the real llama.cpp server is in
``tests/test_real_llms.py``. The response parsers are also fed bodies in the shapes the servers' own
documentation gives (OpenAI's API reference; vLLM and Ollama document the same OpenAI shapes): servers that
cannot run here are tested only that far."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from molal.annotators.base import AnnotatorError
from molal.annotators.openai_compat import (
    OpenAIAnnotator,
    chat_top_logprobs,
    class_mass_from_top,
    completion_top_logprobs,
    label_logprob_from_echo,
)

from .llm_server import TinyLMServer, build_tiny_lm

TEXTS = ["Who wrote Hamlet ?", "Where is the city of Paris ?"]
CLASSES = ["human", "location", "numeric"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import torch

    torch.set_num_threads(1)
    return build_tiny_lm(tmp_path_factory.mktemp("tiny") / "lm", seed=0)


def test_default_scoring_is_top_logprobs_for_both_apis() -> None:
    for api in ("chat", "completions"):
        assert OpenAIAnnotator("a", "http://127.0.0.1:1/v1", "m", api=api).scoring == "top_logprobs"


def test_shifted_echo_is_refused_with_the_reason(model_dir: Path) -> None:
    with TinyLMServer(model_dir, echo_shift=True) as srv:
        a = OpenAIAnnotator("e", srv.base_url, "tiny-llama", api="completions", scoring="echo", concurrency=1)
        with pytest.raises(AnnotatorError, match=r"echoes prompt logprobs that do not match.*shifted.*scoring='top_logprobs'"):
            a.annotate(TEXTS, CLASSES)
        assert not any(isinstance(b.get("prompt"), list) for b in srv.bodies)  # nothing was scored
        n = srv.requests
        with pytest.raises(AnnotatorError, match="shifted"):  # checked again (a fixed server would pass)
            a.annotate(TEXTS, CLASSES)
        assert 0 < srv.requests - n <= 4
        # the same server's top_logprobs path is fine
        ok = OpenAIAnnotator("t", srv.base_url, "tiny-llama", api="completions", top_logprobs=50, concurrency=1)
        assert ok.check_server()["top_logprobs_depth"] > 0


def test_one_prompt_per_request_server_gets_one_prompt_per_request(model_dir: Path) -> None:
    with TinyLMServer(model_dir) as good, TinyLMServer(model_dir, one_prompt=True) as single:
        ref = OpenAIAnnotator("r", good.base_url, "tiny-llama", api="completions", scoring="echo", prompts_per_request=8)
        a = OpenAIAnnotator("s", single.base_url, "tiny-llama", api="completions", scoring="echo", prompts_per_request=8)
        found = a.check_server()
        assert found == {"path": "completions+echo", "echo_aligned": True, "prompts_per_request": 1}
        before = single.requests
        res = a.annotate(TEXTS, CLASSES)
        assert not res.failed and single.requests - before == len(TEXTS) * len(CLASSES)
        assert all(not isinstance(b["prompt"], list) or len(b["prompt"]) == 1 for b in single.bodies[-6:])
        np.testing.assert_allclose(res.probs, ref.annotate(TEXTS, CLASSES).probs, rtol=1e-5)


@pytest.mark.parametrize(("api", "scoring", "feature"), [
    ("chat", "top_logprobs", r"no top_logprobs on chat/completions \(sent logprobs=true, top_logprobs=20\)"),
    ("completions", "top_logprobs", r"no top_logprobs on completions \(sent logprobs=20\)"),
    ("completions", "echo", r"no logprobs for a generated token on completions"),
])
def test_server_without_logprobs_named(model_dir: Path, api: str, scoring: str, feature: str) -> None:
    with TinyLMServer(model_dir, no_logprobs=True) as srv:
        a = OpenAIAnnotator("n", srv.base_url, "tiny-llama", api=api, scoring=scoring)
        with pytest.raises(AnnotatorError, match=feature):
            a.annotate(TEXTS, CLASSES)


# -- parsers against documented response shapes ----------------------------------------------------------
# OpenAI API reference, "Create chat completion" -> "Logprobs" example response (abridged to two tokens).
OPENAI_CHAT_LOGPROBS = {
    "id": "chatcmpl-123", "object": "chat.completion", "created": 1702685778, "model": "gpt-4o-mini",
    "choices": [{
        "index": 0,
        "message": {"role": "assistant", "content": "Hello! How can I assist you today?"},
        "logprobs": {"content": [
            {"token": "Hello", "logprob": -0.31725305, "bytes": [72, 101, 108, 108, 111],
             "top_logprobs": [{"token": "Hello", "logprob": -0.31725305, "bytes": [72, 101, 108, 108, 111]},
                              {"token": "Hi", "logprob": -1.3190403, "bytes": [72, 105]}]},
            {"token": "!", "logprob": -0.02380986, "bytes": [33],
             "top_logprobs": [{"token": "!", "logprob": -0.02380986, "bytes": [33]},
                              {"token": " there", "logprob": -3.787621, "bytes": [32, 116, 104, 101, 114, 101]}]},
        ]},
        "finish_reason": "stop",
    }],
    "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
}

# OpenAI API reference (legacy "Create completion", logprobs object: tokens, token_logprobs, top_logprobs,
# text_offset); vLLM's /v1/completions returns the same object, with echo=true covering the prompt.
COMPLETIONS_ECHO = {
    "id": "cmpl-1", "object": "text_completion", "model": "m",
    "choices": [{
        "index": 0, "text": "Category: human", "finish_reason": "length",
        "logprobs": {"tokens": ["Category", ":", " human"], "token_logprobs": [None, -1.5, -0.25],
                     "top_logprobs": [None, {":": -1.5}, {" human": -0.25, " location": -1.75}],
                     "text_offset": [0, 8, 9]},
    }],
    "usage": {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3},
}


def test_chat_parser_on_openai_documented_body() -> None:
    top = chat_top_logprobs(OPENAI_CHAT_LOGPROBS)
    assert top == {"Hello": -0.31725305, "Hi": -1.3190403}
    mass = class_mass_from_top(top, ["hello", "hi", "bye"])
    np.testing.assert_allclose(mass, [np.exp(-0.31725305), np.exp(-1.3190403), 0.0])


def test_completions_parsers_on_documented_shape() -> None:
    assert completion_top_logprobs({"choices": [{"logprobs": {"top_logprobs": [{" human": -0.25, " location": -1.75}]}}]}) == {
        " human": -0.25, " location": -1.75}
    lp = COMPLETIONS_ECHO["choices"][0]["logprobs"]
    assert label_logprob_from_echo(lp, prompt_len=len("Category:"), full_len=len("Category: human")) == -0.25
    for bad in ({"choices": [{"logprobs": {"top_logprobs": [{}]}}]}, {"choices": [{"text": "x"}]}, {"choices": []}):
        with pytest.raises((KeyError, IndexError, TypeError, ValueError)):
            completion_top_logprobs(bad)
