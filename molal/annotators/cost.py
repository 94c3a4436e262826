"""Know the cost before paying it: an estimate of what annotating a pool with a mixture will take.

:func:`estimate` counts, per annotator, the texts the cache does not hold yet, the prompt and completion
tokens they will need (exact where molal tokenizes the prompt itself — HF transformers —, else about one
token per 4 characters of the rendered prompt), the money at the prices the user configured for paid APIs
(``usd_per_mtok_prompt`` / ``usd_per_mtok_completion`` on an ``openai`` annotator, dollars per million
tokens), and, with ``sample > 0``, the time: that many uncached texts are annotated for real (their answers
go into the cache, so nothing is wasted) and each annotator's seconds per text is extrapolated.

``molal annotate --estimate`` prints it; ``--max-usd`` / ``--max-hours`` refuse a run above a budget. The
backend's training and sync jobs refuse to annotate above ``MOLAL_MAX_ANNOTATE_USD`` /
``MOLAL_MAX_ANNOTATE_HOURS`` with a message saying what the estimate was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from molal.annotators.base import validate_classes, validate_texts


@dataclass
class AnnotatorCost:
    """The estimate for one annotator of the mixture."""

    name: str
    texts_to_annotate: int
    requests: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_exact: bool = False
    usd: float | None = None  # None: the annotator is priced but no price was configured, or it is not billed
    priced: bool = False  # a paid API whose price the user configured
    billed: bool = False  # a remote API (may cost money)
    seconds_per_text: float | None = None
    seconds: float | None = None


@dataclass
class CostEstimate:
    """What annotating ``n_texts`` with the mixture is expected to take."""

    n_texts: int
    annotators: list[AnnotatorCost] = field(default_factory=list)
    sampled: int = 0

    @property
    def usd(self) -> float:
        return float(sum(a.usd or 0.0 for a in self.annotators))

    @property
    def unpriced(self) -> list[str]:
        """Remote annotators with work to do and no configured price (their cost is unknown)."""
        return [a.name for a in self.annotators if a.billed and not a.priced and a.texts_to_annotate]

    @property
    def seconds(self) -> float | None:
        """Seconds if the annotators run one after another (an upper bound: remote ones overlap)."""
        if any(a.seconds is None and a.texts_to_annotate for a in self.annotators):
            return None
        return float(sum(a.seconds or 0.0 for a in self.annotators))

    @property
    def prompt_tokens(self) -> int:
        return int(sum(a.prompt_tokens or 0 for a in self.annotators))

    def over_budget(self, max_usd: float | None = None, max_hours: float | None = None) -> str | None:
        """Why this run is above the budget, in one sentence; None when it is within it."""
        if max_usd is not None:
            if self.unpriced:
                return (f"annotating would call the paid-API annotator(s) {', '.join(self.unpriced)} with no price "
                        f"configured (set usd_per_mtok_prompt / usd_per_mtok_completion; 0 for a free server), so "
                        f"the cost cannot be held to ${max_usd:g}")
            if self.usd > max_usd:
                return (f"annotating {self.n_texts} texts is estimated at ${self.usd:.2f} ({self.prompt_tokens:,} prompt "
                        f"tokens), above the budget of ${max_usd:g}")
        if max_hours is not None:
            secs = self.seconds
            if secs is None:
                return "the time budget needs a time estimate (sample > 0)"
            if secs > max_hours * 3600:
                return (f"annotating {self.n_texts} texts is estimated at {secs / 3600:.2f} h (from {self.sampled} "
                        f"sampled texts), above the budget of {max_hours:g} h")
        return None

    def as_dict(self) -> dict[str, Any]:
        return {"n_texts": self.n_texts, "sampled": self.sampled, "usd": round(self.usd, 4), "seconds": self.seconds,
                "prompt_tokens": self.prompt_tokens, "unpriced": self.unpriced,
                "annotators": [asdict(a) for a in self.annotators]}


def estimate(mixture: Any, texts: Sequence[str], class_names: Sequence[str], *, cache: Any = None,
             descriptions: Mapping[str, str] | None = None, sample: int = 0) -> CostEstimate:
    """Estimate annotating ``texts`` with ``mixture`` (see the module docstring). Only texts the cache lacks
    count; with ``sample > 0`` that many of them are annotated now to time each annotator."""
    names = validate_classes(class_names, descriptions)
    desc = dict(mixture.descriptions)
    desc.update(descriptions or {})
    desc = {c: d for c, d in desc.items() if c in names}
    bad = validate_texts(list(texts))
    uniq = list(dict.fromkeys(t for i, t in enumerate(texts) if i not in bad))
    out = CostEstimate(n_texts=len(uniq))
    missing: list[list[str]] = []
    for a in mixture.annotators:
        if cache is not None and uniq:
            ident = mixture.cache_identity(a, names, desc)
            got = cache.get_many(ident, uniq, n_classes=len(names))
            missing.append([t for t, g in zip(uniq, got, strict=True) if g is None])
        else:
            missing.append(list(uniq))
    timing: dict[str, float] = {}
    if sample > 0:
        todo = list(dict.fromkeys(t for m in missing for t in m))[:sample]
        if todo:
            res = mixture.annotate(todo, names, cache=cache, descriptions=desc)
            out.sampled = len(todo)
            for a in mixture.annotators:
                st = res.stats["per_annotator"][a.name]
                if st["annotated"]:
                    timing[a.name] = st["seconds"] / st["annotated"]
            done = set(todo)
            missing = [[t for t in m if t not in done] for m in missing]
    for a, todo in zip(mixture.annotators, missing, strict=True):
        c = AnnotatorCost(name=a.name, texts_to_annotate=len(todo))
        usage = getattr(a, "usage", None)
        if usage is not None and todo:
            u = usage(todo, names, desc)
            c.requests, c.prompt_tokens, c.completion_tokens, c.tokens_exact = (
                u["requests"], u["prompt_tokens"], u["completion_tokens"], u["exact"])
        price = getattr(a, "price", None)
        c.billed = price is not None
        if price is not None:
            p_in, p_out = price()
            c.priced = p_in is not None or p_out is not None
            if c.priced:
                c.usd = ((c.prompt_tokens or 0) * (p_in or 0.0) + (c.completion_tokens or 0) * (p_out or 0.0)) / 1e6
        if a.name in timing:
            c.seconds_per_text = timing[a.name]
            c.seconds = timing[a.name] * len(todo)
        elif not todo:
            c.seconds = 0.0
        out.annotators.append(c)
    return out


def approx_tokens(text: str) -> int:
    """About one token per 4 characters (English text with a BPE vocabulary); used where molal has no tokenizer."""
    return max(1, math.ceil(len(text) / 4))

