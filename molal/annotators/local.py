"""What the annotators that run a model in this process share (HF transformers :mod:`molal.annotators.hf`,
vLLM :mod:`molal.annotators.vllm`): the prompt options (template, system message, answer prefix, label
verbalizers, few-shot examples, chat or plain prompts, a prefilled answer prefix), the self-consistency sampling options (samples,
temperature, top_p, max_new_tokens, seed), their part of the cache identity, and freeing the model's memory.

Each backend keeps its own explicit constructor signature (the mixture config's fields are read from it)
and hands these options to :meth:`LocalLMAnnotator._init_prompt` / :meth:`LocalLMAnnotator._init_sampling`.
"""

from __future__ import annotations

from typing import Any

from molal.annotators.base import Annotator, check_float, check_positive_int
from molal.annotators.prompts import Prompt, check_chat


class LocalLMAnnotator(Annotator):
    """Base of the in-process LLM annotators. Subclasses call :meth:`_init_prompt` and :meth:`_init_sampling`
    from their constructor and put :meth:`_prompt_identity` into their :meth:`_identity`."""

    prompt: Prompt
    chat: str | bool
    prefill: bool = False
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int

    def _init_prompt(
        self,
        template: str | None,
        system: str | None,
        answer_prefix: str | None,
        verbalizers: dict[str, str] | None,
        examples: list[dict[str, str]] | str | None,
        chat: str | bool,
        preset: str | None = None,
        prefill: bool = False,
        examples_per_class: int = 1,
    ) -> None:
        self.prompt = Prompt.build(template, system, answer_prefix, verbalizers, examples, preset, examples_per_class)
        self.chat = check_chat(chat)
        if not isinstance(prefill, bool):
            raise ValueError(f"prefill must be true or false, got {prefill!r}")
        self.prefill = prefill

    def _init_sampling(self, samples: int, temperature: float, top_p: float, max_new_tokens: int, seed: int) -> None:
        """Self-consistency: ``samples`` answers per text (0 = off), sampled with these parameters."""
        self.samples = check_positive_int(samples, "samples", 0)
        self.temperature = check_float(temperature, "temperature", 0.0, 10.0, lo_open=True)
        self.top_p = check_float(top_p, "top_p", 0.0, 1.0, lo_open=True)
        self.max_new_tokens = check_positive_int(max_new_tokens, "max_new_tokens")
        self.seed = int(seed)

    def _prompt_identity(self) -> dict[str, Any]:
        """The prompt and sampling options' part of the cache identity."""
        out = {
            "prompt": self.prompt.identity(),
            "chat": self.chat,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
        }
        if self.prefill:  # only then: annotators without it keep their cache identity
            out["prefill"] = True
        return out


def release_memory() -> None:
    """Collect garbage and empty the CUDA cache (when torch is there): after a model was dropped."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
