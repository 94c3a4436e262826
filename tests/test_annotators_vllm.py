"""vLLM annotator: the pure request-building / output-parsing functions (vLLM itself is not installed here).

The vLLM-shaped outputs below are computed with a real tiny Llama (prompt logprobs of every position, in
vLLM's layout: None at position 0, then {token_id: logprob}), and the resulting class probabilities must
equal the HF annotator's full-label scoring of the same model."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from molal.annotators import Mixture
from molal.annotators.base import AnnotatorError, softmax
from molal.annotators.hf import HFAnnotator
from molal.annotators.prompts import Prompt
from molal.annotators.vllm import (
    INSTALL_HINT,
    VLLMAnnotator,
    answers_from_outputs,
    build_scoring_requests,
    label_logprob_from_prompt_logprobs,
    render_label_ids,
    render_prompt_ids,
    scores_from_outputs,
)

from .llm_server import build_tiny_lm

CLASSES = ["human", "location", "numeric"]
TEXTS = ["Who wrote Hamlet ?", "Where is Rome ?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    import torch

    torch.set_num_threads(1)
    return build_tiny_lm(tmp_path_factory.mktemp("tiny") / "lm", seed=0)


def _vllm_like_output(lm, token_ids: list[int]) -> SimpleNamespace:
    import torch

    with torch.inference_mode():
        lp = torch.log_softmax(lm(input_ids=torch.tensor([token_ids])).logits[0].float(), -1)
    plp = [None] + [{token_ids[j]: SimpleNamespace(logprob=float(lp[j - 1, token_ids[j]]), rank=1)} for j in range(1, len(token_ids))]
    return SimpleNamespace(prompt_logprobs=plp)


def test_full_label_scores_match_hf_reference(tiny: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny), local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(str(tiny), local_files_only=True).eval()
    prompt = Prompt()
    prompts = [render_prompt_ids(tok, prompt, t, CLASSES, {}, chat=True) for t in TEXTS]
    labels = render_label_ids(tok, CLASSES, chat=True)
    assert any(len(x) > 1 for x in labels)  # multi-token class names
    reqs, meta = build_scoring_requests(prompts, labels)
    assert len(reqs) == 6 and meta[1] == (0, 1, len(labels[1]))
    assert reqs[0]["prompt_token_ids"][: len(prompts[0])] == prompts[0]
    outs = [_vllm_like_output(lm, r["prompt_token_ids"]) for r in reqs]
    probs = softmax(scores_from_outputs(outs, reqs, meta, 2, 3), axis=1)
    hf = HFAnnotator("h", str(tiny), scoring="full").annotate(TEXTS, CLASSES)
    np.testing.assert_allclose(probs, hf.probs, rtol=1e-4, atol=1e-7)
    # the plain-prompt variant puts a space before the label
    assert render_label_ids(tok, ["location"], chat=False) != render_label_ids(tok, ["location"], chat=True)


def test_parsing_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="no logprob for prompt token 2"):
        label_logprob_from_prompt_logprobs([None, {5: -1.0}, {9: -2.0}], [1, 5, 7], 1)
    with pytest.raises(ValueError, match="positions"):
        label_logprob_from_prompt_logprobs([None], [1, 2], 1)
    assert label_logprob_from_prompt_logprobs([None, {5: -1.0}, {7: -2.0}], [1, 5, 7], 2) == -3.0
    out = SimpleNamespace(outputs=[SimpleNamespace(text=" human"), SimpleNamespace(text="Location.")])
    assert answers_from_outputs([out]) == [[" human", "Location."]]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_missing_vllm_gives_install_hint(tmp_path: Path) -> None:
    a = VLLMAnnotator("v", "some/model")
    with pytest.raises(AnnotatorError, match=r"pip install molal\[vllm\]"):
        a.annotate(["x"], ["a", "b"])
    assert "pip install molal[vllm]" in INSTALL_HINT
    # in a mixture it is a per-row failure, nothing cached
    from molal.cache import AnnotationCache

    cache = AnnotationCache(tmp_path / "c.sqlite")
    res = Mixture([a]).annotate(["x", "y"], ["a", "b"], cache=cache)
    assert sorted(res.failed) == [0, 1] and "pip install" in res.failed[0] and cache.count() == 0


def test_vllm_config_fields(tmp_path: Path) -> None:
    p = tmp_path / "m.toml"
    p.write_text('[[annotator]]\ntype = "vllm"\nname = "qwen"\nmodel = "Qwen/Qwen2.5-7B-Instruct"\nsamples = 10\n'
                 '[[annotator]]\ntype = "vllm"\nname = "llama"\nmodel = "meta-llama/Llama-3.1-8B-Instruct"\n')
    mix = Mixture.from_config(p)
    assert mix.llm_names == ["qwen", "llama"] and all(a.exclusive for a in mix.annotators)
    assert mix.annotators[0].identity() != mix.annotators[1].identity()
