"""vLLM in-process annotator (optional: ``pip install molal[vllm]``; needs a GPU).

Kept thin: request building and output parsing are pure functions (unit-tested without vLLM).

Class scores: for every (text, class) the token ids ``prompt + label`` are scored in one batched
``LLM.generate`` call with ``SamplingParams(max_tokens=1, prompt_logprobs=0)``; log P(label | prompt) is the
sum of the prompt-logprobs of the label's tokens (all of them: multi-token class names are handled
exactly, unlike the paper's substring sums over the top-100 first tokens), then a softmax over classes.
The K sequences of a text share the prompt prefix, so ``enable_prefix_caching`` lets vLLM reuse its KV
blocks (some vLLM versions recompute prefixes for requests that ask for prompt logprobs; the sampling pass
always benefits). Self-consistency: ``n=T`` samples per prompt (temperature, top_p, max_tokens, seed).

A mixture with vLLM annotators runs them one after another (``exclusive = True``): each model is loaded,
used for all its texts, and freed (:meth:`VLLMAnnotator.close`) before the next one is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from molal.annotators.base import (
    AnnotatorError,
    AnnotatorResult,
    AnnotatorUnavailable,
    check_calibrate,
    check_float,
    check_name,
    check_positive_int,
    consistency_from_answers,
    softmax,
)
from molal.annotators.local import LocalLMAnnotator, release_memory
from molal.annotators.prompts import (
    render_label_ids,
    render_prompt_ids,
    uses_chat,
)

INSTALL_HINT = "vLLM is not installed: pip install molal[vllm] (needs a CUDA GPU)"


# -- pure helpers (no vLLM needed; render_prompt_ids / render_label_ids come from molal.annotators.prompts) --


def build_scoring_requests(prompt_ids: Sequence[list[int]], label_ids: Sequence[list[int]]) -> tuple[list[dict], list[tuple[int, int, int]]]:
    """One ``{"prompt_token_ids": prompt + label}`` per (text, class), texts outermost (shared prefixes are
    adjacent, which helps prefix caching), and the bookkeeping ``(text, class, n_label_tokens)``."""
    reqs, meta = [], []
    for i, p in enumerate(prompt_ids):
        for c, lab in enumerate(label_ids):
            reqs.append({"prompt_token_ids": list(p) + list(lab)})
            meta.append((i, c, len(lab)))
    return reqs, meta


def _lp_value(entry: Any) -> float:
    return float(entry.logprob if hasattr(entry, "logprob") else entry)


def label_logprob_from_prompt_logprobs(prompt_logprobs: Sequence[Any], token_ids: Sequence[int], n_label: int) -> float:
    """Sum of the logprobs of the last ``n_label`` prompt tokens. ``prompt_logprobs[j]`` is None for j=0 and
    otherwise a mapping token id -> Logprob (or float) that contains the actual token ``token_ids[j]``."""
    if len(prompt_logprobs) != len(token_ids):
        raise ValueError(f"prompt_logprobs has {len(prompt_logprobs)} positions for {len(token_ids)} tokens")
    if n_label < 1 or n_label >= len(token_ids):
        raise ValueError("the label must have at least one token and follow a non-empty prompt")
    total = 0.0
    for j in range(len(token_ids) - n_label, len(token_ids)):
        entry = prompt_logprobs[j]
        if entry is None or token_ids[j] not in entry:
            raise ValueError(f"no logprob for prompt token {j}")
        total += _lp_value(entry[token_ids[j]])
    return total


def scores_from_outputs(outputs: Sequence[Any], reqs: Sequence[dict], meta: Sequence[tuple[int, int, int]], n: int, k: int) -> np.ndarray:
    """(n, K) label log-probabilities from vLLM RequestOutputs (``.prompt_logprobs``), in request order."""
    if len(outputs) != len(reqs):
        raise ValueError(f"{len(outputs)} outputs for {len(reqs)} requests")
    scores = np.full((n, k), np.nan)
    for out, req, (i, c, n_lab) in zip(outputs, reqs, meta, strict=True):
        scores[i, c] = label_logprob_from_prompt_logprobs(out.prompt_logprobs, req["prompt_token_ids"], n_lab)
    return scores


def answers_from_outputs(outputs: Sequence[Any]) -> list[list[str]]:
    """The sampled answer texts of each RequestOutput (``.outputs[j].text``)."""
    return [[o.text for o in out.outputs] for out in outputs]


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise AnnotatorUnavailable(INSTALL_HINT) from exc
    return vllm


# -- the annotator ---------------------------------------------------------------------------------------
class VLLMAnnotator(LocalLMAnnotator):
    """A model served in-process by vLLM. See the module docstring."""

    type = "vllm"
    _runtime = {"_llm": lambda: None}
    exclusive = True  # needs the GPU to itself: the mixture runs it annotator-major and frees it after

    def __init__(
        self,
        name: str,
        model: str,
        template: str | None = None,
        system: str | None = None,
        answer_prefix: str | None = None,
        verbalizers: dict[str, str] | None = None,
        examples: list[dict[str, str]] | str | None = None,
        examples_per_class: int = 1,
        preset: str | None = None,
        chat: str | bool = "auto",
        prefill: bool = False,
        calibrate: str | None = None,
        samples: int = 0,
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_new_tokens: int = 8,
        seed: int = 0,
        batch_size: int = 512,
        dtype: str = "auto",
        max_model_len: int = 4096,
        gpu_memory_utilization: float = 0.85,
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.name = check_name(name)
        if not isinstance(model, str) or not model:
            raise ValueError("model must be a model folder or name")
        self.model = model
        self._init_prompt(template, system, answer_prefix, verbalizers, examples, chat, preset, prefill,
                          examples_per_class)
        self.calibrate = check_calibrate(calibrate)
        self._init_sampling(samples, temperature, top_p, max_new_tokens, seed)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.dtype = str(dtype)
        self.max_model_len = check_positive_int(max_model_len, "max_model_len", 64)
        self.gpu_memory_utilization = check_float(gpu_memory_utilization, "gpu_memory_utilization", 0.05, 1.0)
        self.tensor_parallel_size = check_positive_int(tensor_parallel_size, "tensor_parallel_size")
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._llm: Any = None

    def _identity(self) -> dict[str, Any]:
        return {
            "model": self.model,
            **self._prompt_identity(),
            "scoring": "full_label_prompt_logprobs",
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
        }

    def _load(self) -> Any:
        if self._llm is None:
            vllm = import_vllm()
            try:
                self._llm = vllm.LLM(
                    model=self.model, dtype=self.dtype, max_model_len=self.max_model_len, seed=self.seed,
                    gpu_memory_utilization=self.gpu_memory_utilization, tensor_parallel_size=self.tensor_parallel_size,
                    enable_prefix_caching=self.enable_prefix_caching,
                )
            except Exception as exc:  # vLLM raises many types (OSError, ValueError, RuntimeError)
                raise AnnotatorError(f"annotator {self.name!r}: vLLM cannot load {self.model!r}: {exc}") from exc
        return self._llm

    def close(self) -> None:
        """Free the GPU memory of this model (so the next model of the mixture fits)."""
        if self._llm is None:
            return
        self._llm = None
        try:
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:  # pragma: no cover - depends on the vLLM version
            pass
        release_memory()

    def _annotate(self, texts: list[str], class_names: list[str], descriptions: dict[str, str]) -> AnnotatorResult:
        self.prompt.check_classes(class_names)
        vllm = import_vllm()
        llm = self._load()
        tok = llm.get_tokenizer()
        chat = uses_chat(tok, self.chat)
        prompts = [render_prompt_ids(tok, self.prompt, t, class_names, descriptions, chat, self.prefill) for t in texts]
        labels = render_label_ids(tok, self.prompt.label_words(class_names), chat, None, self.prefill)
        reqs, meta = build_scoring_requests(prompts, labels)
        params = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = llm.generate(reqs, params, use_tqdm=False)
        scores = scores_from_outputs(outs, reqs, meta, len(texts), len(class_names))
        n_tok = sum(len(r["prompt_token_ids"]) for r in reqs)
        cons = None
        if self.samples > 0:
            sp = vllm.SamplingParams(
                n=self.samples, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_new_tokens, seed=self.seed
            )
            gen = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
            words = self.prompt.label_words(class_names)
            cons = np.array([consistency_from_answers(a, class_names, words) for a in answers_from_outputs(gen)])
            n_tok += sum(len(o.token_ids) for out in gen for o in out.outputs)
        return AnnotatorResult(probs=softmax(scores, axis=1), consistency=cons, tokens=n_tok)
