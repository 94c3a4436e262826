"""HF transformers annotator on a tiny random Llama built in the test (real forward passes and generate)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from molal.annotators import Mixture
from molal.annotators.base import AnnotatorError
from molal.annotators.hf import HFAnnotator
from molal.cache import AnnotationCache

from .llm_server import build_tiny_lm

TEXTS = ["Who wrote Hamlet ?", "Where is the city of Paris located in the world ?", "How many ?", "What is a noun ?"]
CLASSES = ["human", "location", "numeric"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    import torch

    torch.set_num_threads(1)
    return build_tiny_lm(tmp_path_factory.mktemp("tiny") / "lm", seed=0)


@pytest.fixture(scope="module")
def tiny_plain(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tinyp") / "lm", seed=1, chat=False)


def _naive_label_logprob(model_dir: Path, prompt_ids: list[int], label_ids: list[int]) -> float:
    """log P(label | prompt) from one unpadded forward pass (independent of the annotator's batching)."""
    import torch
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    with torch.inference_mode():
        lp = torch.log_softmax(lm(input_ids=torch.tensor([prompt_ids + label_ids])).logits[0].float(), -1)
    n = len(prompt_ids)
    return float(sum(lp[n + j - 1, t] for j, t in enumerate(label_ids)))


@pytest.mark.parametrize("reuse", [True, False])
def test_full_label_scoring_matches_unpadded_reference(tiny: Path, reuse: bool) -> None:
    a = HFAnnotator("t", str(tiny), batch_size=3, reuse_prompt_cache=reuse)  # padded batches
    res = a.annotate(TEXTS, CLASSES)
    assert not res.failed and res.tokens > 0
    np.testing.assert_allclose(res.probs.sum(1), 1.0)
    labels = a.label_ids(CLASSES)
    assert max(len(x) for x in labels) > 1 and a.scoring_mode(labels) == "full"  # multi-token names here
    for i, t in enumerate(TEXTS):
        ref = np.array([_naive_label_logprob(tiny, a.prompt_ids(t, CLASSES, {}), lab) for lab in labels])
        ref = np.exp(ref - ref.max())
        np.testing.assert_allclose(res.probs[i], ref / ref.sum(), rtol=1e-4, atol=1e-6)


def test_first_token_scoring_matches_reference(tiny: Path) -> None:
    a = HFAnnotator("t", str(tiny), scoring="first_token", batch_size=3)
    labels = a.label_ids(CLASSES)
    assert len({x[0] for x in labels}) == 3
    res = a.annotate(TEXTS, CLASSES)
    for i, t in enumerate(TEXTS):
        ref = np.array([_naive_label_logprob(tiny, a.prompt_ids(t, CLASSES, {}), lab[:1]) for lab in labels])
        ref = np.exp(ref - ref.max())
        np.testing.assert_allclose(res.probs[i], ref / ref.sum(), rtol=1e-4, atol=1e-6)
    # first-token scores differ from whole-label scores when names are multi-token
    full = HFAnnotator("t", str(tiny), scoring="full").annotate(TEXTS, CLASSES)
    assert not np.allclose(full.probs, res.probs)


def test_first_token_refused_when_ambiguous(tiny: Path) -> None:
    a = HFAnnotator("t", str(tiny), scoring="first_token")
    with pytest.raises(ValueError, match="distinct first tokens"):
        a.annotate(TEXTS[:1], ["abbreviation", "about", "human"])  # 'a' + 'a...' share the first token


def test_chat_template_used_when_present_else_plain(tiny: Path, tiny_plain: Path) -> None:
    a = HFAnnotator("t", str(tiny))
    assert a.uses_chat()
    s = a._tok.decode(a.prompt_ids(TEXTS[0], CLASSES, {}))
    assert "<|user|>" in s and s.rstrip().endswith("<|assistant|>")
    b = HFAnnotator("p", str(tiny_plain))
    assert not b.uses_chat()
    s = b._tok.decode(b.prompt_ids(TEXTS[0], CLASSES, {"human": "a person"}))
    assert s.endswith("Category:") and "- human: a person" in s
    res = b.annotate(TEXTS, CLASSES)
    np.testing.assert_allclose(res.probs.sum(1), 1.0)


def test_consistency_from_sampled_answers(tiny: Path) -> None:
    import torch

    a = HFAnnotator("t", str(tiny), samples=5, temperature=0.01, top_p=0.5, max_new_tokens=1)
    # what the model greedily answers for the first text becomes the verbalizer of class "x"
    ids = a.prompt_ids(TEXTS[0], ["x", "y"], {})
    with torch.inference_mode():
        nxt = int(a._lm(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    word = a._tok.decode([nxt])
    assert word.strip(), f"greedy token {word!r} is blank; pick another seed"
    b = HFAnnotator("t", str(tiny), samples=5, temperature=0.01, top_p=0.5, max_new_tokens=1, verbalizers={"x": word.strip()})
    res = b.annotate(TEXTS[:1], ["x", "y"])
    np.testing.assert_allclose(res.consistency[0], [1.0, 0.0])
    c = HFAnnotator("t", str(tiny), samples=5, max_new_tokens=1).annotate(TEXTS[:2], CLASSES)
    assert c.consistency.shape == (2, 3) and (c.consistency.sum(1) <= 1 + 1e-9).all()


def test_hf_in_mixture_is_cached(tiny: Path, tmp_path: Path) -> None:
    cache = AnnotationCache(tmp_path / "c.sqlite")
    mix = Mixture([HFAnnotator("t", str(tiny), batch_size=6)])
    r1 = mix.annotate(TEXTS, CLASSES, cache=cache)
    r2 = mix.annotate(TEXTS, CLASSES, cache=cache)
    assert r1.stats["cache_misses"] == 4 and r2.stats["cache_hits"] == 4 and r2.stats["annotated"] == 0
    np.testing.assert_allclose(r1.outputs.probs, r2.outputs.probs)
    # a different prompt template is a different cache entry
    other = Mixture([HFAnnotator("t", str(tiny), template="Text: {text}\nLabels: {labels}")])
    assert other.annotate(TEXTS, CLASSES, cache=cache).stats["cache_hits"] == 0


def test_missing_model_is_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AnnotatorError, match="cannot load the model"):
        HFAnnotator("t", str(tmp_path / "nope")).annotate(["x"], ["a", "b"])


def test_exclusive_annotators_run_one_after_another_and_are_freed(tiny: Path) -> None:
    a, b = HFAnnotator("a", str(tiny)), HFAnnotator("b", str(tiny), template="Q: {text} ({labels})")
    a.exclusive = True  # as a vLLM annotator: the mixture runs annotator-major and frees each model after
    res = Mixture([a, b]).annotate(TEXTS, CLASSES)
    assert len(res.done_idx) == 4 and a._lm is None and b._lm is None
