"""Prompt building shared by the LLM annotators (HF, OpenAI-compatible, vLLM).

A :class:`Prompt` renders one classification prompt for a text, either as plain text (completion models;
it ends with ``answer_prefix`` and the class verbalizer follows after one space) or as chat messages (the
assistant's reply should be the verbalizer alone). Its :meth:`Prompt.identity` goes into the cache key.

Template placeholders: ``{text}``, ``{labels}`` (comma-separated verbalizers), ``{descriptions}`` (one
"- label: description" line per described class, or empty), ``{examples}`` (few-shot block or empty),
``{task}`` (the task framing, e.g. a Label Studio project's labelling instructions, or empty; a template
without ``{task}`` gets the framing as its first line).
An annotator's ``preset = "<dataset>"`` (:mod:`molal.annotators.presets`: trec, ag_news, sst2, imdb,
pubmed-20k-rct, banking77) brings that dataset's task framing and class descriptions; options given
explicitly win.

The annotators that tokenize prompts themselves (HF transformers, vLLM) also share :func:`check_chat`,
:func:`uses_chat`, :func:`render_prompt_ids` and :func:`render_label_ids` (any HF-style tokenizer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TEMPLATE = (
    "Classify the text into exactly one of these categories: {labels}.\n"
    "{descriptions}{examples}"
    "Text: {text}\n"
    "Answer with the category name only."
)
DEFAULT_SYSTEM = "You are a careful annotator for text classification."
DEFAULT_ANSWER_PREFIX = "Category:"
_FIELDS = ("text", "labels", "descriptions", "examples", "task")
#: at most this many labelled texts (not the examples) measure a few-shot prompt's bias
#: (:meth:`Prompt.with_seed_examples`); with fewer than MIN_CALIBRATION_TEXTS the content-free inputs do
CALIBRATION_TEXTS = 32
MIN_CALIBRATION_TEXTS = 8
#: the longest task framing a prompt takes (characters); longer framings are refused by :class:`Prompt`
MAX_TASK_CHARS = 2000
CHAT_MODES = ("auto", True, False)


@dataclass
class Prompt:
    """A prompt template plus label verbalizers and optional few-shot examples.

    template: the user message / prompt body (placeholders above).
    system: system message for chat models ("" for none).
    answer_prefix: appended (on a new line) to plain prompts; the answer follows after one space.
    verbalizers: class name -> the words the model should answer (default: the class name itself).
    examples: few-shot examples, each ``{"text": ..., "label": <class name>}``; ``"seeds"`` in a config
        (:meth:`build`) means "the project's human-labelled tasks": ``examples_per_class`` of each class, the
        lowest task ids first, filled in by :meth:`with_seed_examples` (the Label Studio jobs do it; until a
        project has labels the prompt has no examples).
    descriptions: class name -> description, rendered in ``{descriptions}`` unless the caller describes
        that class itself (a dataset preset's, :mod:`molal.annotators.presets`).
    """

    template: str = DEFAULT_TEMPLATE
    system: str = DEFAULT_SYSTEM
    answer_prefix: str = DEFAULT_ANSWER_PREFIX
    verbalizers: dict[str, str] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)
    #: class descriptions of the prompt itself (a preset's); the caller's descriptions override them per class
    descriptions: dict[str, str] = field(default_factory=dict)
    #: "seeds": the examples are to come from the project's labelled tasks (:meth:`with_seed_examples`)
    examples_from: str | None = None
    examples_per_class: int = 1
    #: the task framing (a Label Studio project's labelling instructions, a mixture file's ``task``): rendered
    #: at ``{task}``, or as the first line of the prompt when the template has no ``{task}``
    task: str = ""
    #: real texts of the project, without their labels, on which ``calibrate = "content_free"`` measures the
    #: model's bias under this prompt (filled by :meth:`with_seed_examples`: the labelled texts it did not take
    #: as examples); empty: the content-free inputs (:data:`molal.annotators.base.CONTENT_FREE_TEXTS`)
    calibration_texts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or "{text}" not in self.template:
            raise ValueError("prompt template must be a string containing the placeholder {text}")
        try:
            self.template.format(**{f: "" for f in _FIELDS})
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"prompt template has an unknown or malformed placeholder ({exc}); allowed: {', '.join('{' + f + '}' for f in _FIELDS)}"
            ) from None
        if not isinstance(self.verbalizers, Mapping):
            raise ValueError("verbalizers must be a table class name -> answer words")
        for k, v in self.verbalizers.items():
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"verbalizers[{k!r}] must be a non-empty string")
        self.verbalizers = dict(self.verbalizers)
        ex = []
        for i, e in enumerate(self.examples or []):
            if not isinstance(e, Mapping) or not isinstance(e.get("text"), str) or not isinstance(e.get("label"), str):
                raise ValueError(f"examples[{i}] must be a table with string fields 'text' and 'label'")
            ex.append({"text": e["text"], "label": e["label"]})
        self.examples = ex
        if not isinstance(self.descriptions, Mapping) or not all(
                isinstance(v, str) for v in self.descriptions.values()):
            raise ValueError("descriptions must be a table class name -> description")
        self.descriptions = dict(self.descriptions)
        if self.examples_from not in (None, "seeds"):
            raise ValueError(f"examples must be a list of examples or \"seeds\", got {self.examples_from!r}")
        if not isinstance(self.task, str) or len(self.task) > MAX_TASK_CHARS:
            raise ValueError(f"the task framing must be a string of at most {MAX_TASK_CHARS} characters")
        if isinstance(self.examples_per_class, bool) or not isinstance(self.examples_per_class, int) or not (
                1 <= self.examples_per_class <= 8):
            raise ValueError(f"examples_per_class must be an integer from 1 to 8, got {self.examples_per_class!r}")

    @classmethod
    def build(cls, template: str | None = None, system: str | None = None, answer_prefix: str | None = None,
              verbalizers: Mapping[str, str] | None = None,
              examples: Sequence[Mapping[str, str]] | str | None = None,
              preset: str | None = None, examples_per_class: int = 1) -> Prompt:
        """A prompt from an annotator's options: the defaults, then the dataset ``preset``'s template, system
        message and class descriptions (:mod:`molal.annotators.presets`), then every option given."""
        kw: dict[str, Any] = {}
        if preset is not None:
            from molal.annotators.presets import preset as get_preset

            p = get_preset(preset)
            kw = {"template": p["template"], "system": p["system"], "descriptions": p["descriptions"]}
        for key, value in (("template", template), ("system", system), ("answer_prefix", answer_prefix)):
            if value is not None:
                kw[key] = value
        if isinstance(examples, str):
            if examples != "seeds":
                raise ValueError(f"examples must be a list of examples or \"seeds\", got {examples!r}")
            return cls(**kw, verbalizers=dict(verbalizers or {}), examples=[], examples_from="seeds",
                       examples_per_class=examples_per_class)
        return cls(**kw, verbalizers=dict(verbalizers or {}), examples=list(examples or []),
                   examples_per_class=examples_per_class)

    def with_seed_examples(self, labelled: Sequence[Mapping[str, str]]) -> Prompt:
        """This prompt with its ``"seeds"`` examples filled in from ``labelled`` (``{"text", "label"}``, in the
        order to prefer: the first ``examples_per_class`` of each class, in class order of first appearance).
        A prompt with explicit examples is returned unchanged. The result's identity is that of a prompt
        given those examples explicitly, so the cache is shared with it (uncalibrated: a calibrated annotator's
        identity adds its calibration texts).

        The labelled texts not taken as examples (the first :data:`CALIBRATION_TEXTS`, when there are at least
        :data:`MIN_CALIBRATION_TEXTS`) become :attr:`calibration_texts`: with examples in the prompt, the
        content-free inputs misread a small model's bias (Gemma-3-270M with one AG News example per class gave
        "Sci/Tech" 1% on them and so every text "Sci/Tech" after dividing), while its mean answer on real texts
        of the project reads it well (batch calibration, Zhou et al. 2024)."""
        if self.examples_from != "seeds":
            return self
        import dataclasses

        per: dict[str, int] = {}
        chosen = []
        for e in labelled:
            if per.get(e["label"], 0) < self.examples_per_class and isinstance(e.get("text"), str):
                per[e["label"]] = per.get(e["label"], 0) + 1
                chosen.append({"text": e["text"], "label": e["label"]})
        shown = {c["text"] for c in chosen}
        rest = [e["text"] for e in labelled if isinstance(e.get("text"), str) and e["text"].strip()
                and e["text"] not in shown][:CALIBRATION_TEXTS]
        return dataclasses.replace(self, examples=chosen, examples_from=None,
                                   calibration_texts=rest if len(rest) >= MIN_CALIBRATION_TEXTS else [])

    def with_task(self, task: str | None) -> Prompt:
        """This prompt with the task framing ``task`` ("" or None: none). Its identity changes with it."""
        import dataclasses

        task = " ".join((task or "").split())
        return self if task == self.task else dataclasses.replace(self, task=task)

    def check_classes(self, class_names: Sequence[str]) -> None:
        """Verbalizers and few-shot labels must name classes of the project."""
        unknown = [k for k in self.verbalizers if k not in class_names]
        if unknown:
            raise ValueError(f"verbalizers name unknown classes {unknown}; classes are {list(class_names)}")
        for i, e in enumerate(self.examples):
            if e["label"] not in class_names:
                raise ValueError(f"examples[{i}] has label {e['label']!r}, not one of the classes {list(class_names)}")
        verbs = self.label_words(class_names)
        if len({v.strip().lower() for v in verbs}) != len(verbs):
            raise ValueError(f"two classes have the same verbalizer: {verbs}")

    def label_words(self, class_names: Sequence[str]) -> list[str]:
        return [self.verbalizers.get(c, c) for c in class_names]

    def _body(self, text: str, class_names: Sequence[str], descriptions: Mapping[str, str] | None) -> str:
        words = self.label_words(class_names)
        desc = ""
        descriptions = {**self.descriptions, **{c: d for c, d in (descriptions or {}).items() if d}}
        if descriptions:
            lines = [f"- {w}: {descriptions[c]}" for c, w in zip(class_names, words, strict=True) if descriptions.get(c)]
            desc = "Categories:\n" + "\n".join(lines) + "\n" if lines else ""
        exs = ""
        if self.examples:
            verb = dict(zip(class_names, words, strict=True))
            exs = "Examples:\n" + "".join(f"Text: {e['text']}\nCategory: {verb[e['label']]}\n" for e in self.examples)
        body = self.template.format(text=text, labels=", ".join(words), descriptions=desc, examples=exs,
                                    task=self.task + "\n" if self.task else "")
        if self.task and "{task}" not in self.template:
            body = f"{self.task}\n{body}"
        return body

    def plain(self, text: str, class_names: Sequence[str], descriptions: Mapping[str, str] | None = None) -> str:
        """Plain completion prompt; the answer is ``" " + verbalizer`` right after it."""
        body = self._body(text, class_names, descriptions)
        return f"{body}\n{self.answer_prefix}" if self.answer_prefix else body

    def messages(
        self, text: str, class_names: Sequence[str], descriptions: Mapping[str, str] | None = None
    ) -> list[dict[str, str]]:
        """Chat messages; the assistant's answer is the verbalizer alone."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs.append({"role": "user", "content": self._body(text, class_names, descriptions)})
        return msgs

    def identity(self) -> dict[str, Any]:
        out = {
            "template": self.template,
            "system": self.system,
            "answer_prefix": self.answer_prefix,
            "verbalizers": dict(sorted(self.verbalizers.items())),
            "examples": self.examples,
        }
        if self.descriptions:  # only then: prompts without descriptions keep their cache identity
            out["descriptions"] = dict(sorted(self.descriptions.items()))
        if self.task:  # likewise
            out["task"] = self.task
        return out

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Prompt:
        """Build from annotator spec fields ``preset``, ``template``, ``system``, ``answer_prefix``,
        ``verbalizers``, ``examples`` (:meth:`build`)."""
        return cls.build(**{k: spec[k] for k in ("template", "system", "answer_prefix", "verbalizers", "examples",
                                                  "examples_per_class",
                                                  "preset") if k in spec})


# -- token ids (annotators that tokenize prompts themselves: HF transformers, vLLM) ---------------------------
def check_chat(chat: Any) -> str | bool:
    """The ``chat`` option: ``"auto"`` (the tokenizer's chat template when it has one), true or false."""
    if chat not in CHAT_MODES:
        raise ValueError(f"chat must be 'auto', true or false, got {chat!r}")
    return chat


def uses_chat(tokenizer: Any, chat: str | bool) -> bool:
    """Whether prompts go through the tokenizer's chat template (``chat="auto"``: when it has one)."""
    if chat == "auto":
        return bool(getattr(tokenizer, "chat_template", None))
    return bool(chat)


def render_prompt_ids(
    tokenizer: Any, prompt: Prompt, text: str, class_names: Sequence[str], descriptions: Mapping[str, str] | None,
    chat: bool, prefill: bool = False,
) -> list[int]:
    """Token ids of the prompt: chat template (with generation prompt) or plain prompt with special tokens.

    ``prefill`` (chat only): the assistant's reply is started with the answer prefix (``Category:``), so the
    class name is the very next word. Without it a small chat model tends to talk first ("The text is…")
    and the first-token probabilities of the class names mean little."""
    if chat:
        s = tokenizer.apply_chat_template(prompt.messages(text, class_names, descriptions), add_generation_prompt=True, tokenize=False)
        if prefill and prompt.answer_prefix:
            s += prompt.answer_prefix
        return list(tokenizer(s, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt.plain(text, class_names, descriptions), add_special_tokens=True)["input_ids"])


def render_label_ids(
    tokenizer: Any, words: Sequence[str], chat: bool, class_names: Sequence[str] | None = None, prefill: bool = False,
) -> list[list[int]]:
    """Token ids of each class verbalizer as a continuation (a leading space after plain prompts and after a
    prefilled answer prefix). An empty tokenization is an error naming the verbalizer, or its class when
    ``class_names`` are given."""
    sep = "" if chat and not prefill else " "
    out = [list(tokenizer(sep + w, add_special_tokens=False)["input_ids"]) for w in words]
    for i, (w, ids) in enumerate(zip(words, out, strict=True)):
        if not ids:
            what = f"class {class_names[i]!r}" if class_names is not None else f"verbalizer {w!r}"
            raise ValueError(f"{what} tokenizes to nothing")
    return out
