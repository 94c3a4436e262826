"""The reference of every annotator option and prompt preset, generated from the code: ``molal annotators``
prints it, ``molal annotators --output docs/annotators.md`` writes the file the docs link to.

Types and defaults come from each annotator type's constructor (the mixture file's fields are read from it,
:func:`molal.annotators.mixture.build_annotator`), the presets from :data:`molal.annotators.presets.PRESETS`;
only the meaning of each option is written here (:data:`OPTION_DOCS`). A test fails when an option has no
line (:func:`undocumented`).
"""

from __future__ import annotations

import inspect
from typing import Any

from molal.annotators.mixture import ANNOTATOR_TYPES, _annotator_class

#: what each annotator type is (one line)
TYPE_DOCS: dict[str, str] = {
    "openai": "an OpenAI-compatible HTTP server: `vllm serve`, Ollama, llama.cpp's server (llama-cpp-python), "
              "hosted APIs (`type = \"openai_compat\"` is the same)",
    "vllm": "vLLM in this process (the `vllm` extra and a CUDA GPU); members run one after another",
    "hf": "a Hugging Face causal LM in this process (transformers; CPU or GPU), from a local folder or a shipped "
          "model (`model = \"smollm2-135m\"`, `molal models`)",
    "embedding": "a zero-shot scorer: cosine similarity of the text's and each class's sentence embedding "
                 "(offline; the default mixture's members). Not a language model: its predictions are "
                 "`scorer:<name>`",
    "replay": "recorded LLM outputs, served by exact text (the demo's TREC recordings)",
}

#: option -> meaning; a table ``{type: meaning, "*": meaning}`` where the meaning differs between types
OPTION_DOCS: dict[str, str | dict[str, str]] = {
    "name": "The member's name: unique in the mixture; Label Studio shows its votes as `llm:<name>` "
            "(`scorer:<name>` for an embedding scorer).",
    "model": {
        "openai": "The model name the server knows (its `model` field).",
        "vllm": "A Hugging Face model id or local folder vLLM loads.",
        "hf": "A local transformers folder, or a shipped model's name (`smollm2-135m`, `gemma3-270m`: converted "
              "once into the model cache).",
        "embedding": "The sentence encoder: `minilm` (the bundled all-MiniLM-L6-v2) or a local folder.",
    },
    "base_url": "The server's OpenAI API root, e.g. `http://localhost:8000/v1` (http or https).",
    "api": "`chat` (chat/completions; the server applies the model's chat template) or `completions` (a plain "
           "prompt: base models, and llama.cpp's server for a model whose chat endpoint returns no top_logprobs).",
    "api_key": "The API key itself (prefer `api_key_env`); never logged, not part of the cache key.",
    "api_key_env": "The environment variable that holds the API key (read at the first request).",
    "template": "The prompt body; placeholders `{text}` (required), `{labels}`, `{descriptions}`, `{examples}`, "
                "`{task}`. Default: molal's generic template (or the preset's).",
    "system": "The system message of chat prompts (`\"\"` for none).",
    "answer_prefix": "What a plain prompt ends with, and a prefilled chat reply starts with (`Category:`); the "
                     "class name follows after one space.",
    "verbalizers": "A table class -> the words the model should answer for it (default: the class name).",
    "examples": "Few-shot examples: a list of `{text, label}` tables, or `\"seeds\"`: the project's human "
                "labels (in Label Studio's jobs; `examples_per_class` of each class, lowest task id first).",
    "examples_per_class": "With `examples = \"seeds\"`: how many labelled tasks of each class (1-8).",
    "preset": "A dataset's task framing and class descriptions (see Presets below); explicit options and "
              "described classes win.",
    "chat": "`auto` (the tokenizer's chat template when it has one), `true` or `false` (a plain prompt).",
    "prefill": "Chat prompts only: start the assistant's reply with `answer_prefix`, so the class name is the "
               "next word (small chat models otherwise start with \"The text is…\"). In this process only: an "
               "OpenAI-compatible server's chat API cannot continue a started reply (use `api = \"completions\"` "
               "there).",
    "calibrate": "`\"content_free\"`: divide each text's class probabilities by those the model gives "
                 "content-free inputs (\"N/A\", \"[MASK]\", \"-\") under the same prompt, then renormalise: "
                 "removes a small model's prior for some class words. With `examples = \"seeds\"` the bias is "
                 "measured instead on up to 32 labelled texts of the project that the prompt does not show (their "
                 "mean answer; their labels are not read): with examples in the prompt, content-free inputs "
                 "misjudge it. Off by default.",
    "scoring": {
        "openai": "`auto` (= `top_logprobs`: the first generated token's top log-probabilities, following an "
                  "ambiguous first token on the completions API) or `echo` (completions only: the whole class "
                  "name's log-probability from the echoed prompt; checked against the server first).",
        "hf": "`auto`, `first_token` (the next-token probability of each class's first token: one forward pass) "
              "or `full` (the whole class name's log-probability: exact for multi-token names).",
    },
    "top_logprobs": "How many top log-probabilities to ask for (the server may cap it: OpenAI at 20).",
    "samples": {
        "*": "Self-consistency: this many sampled answers per text (0 = none); the share naming each class is a "
             "feature MoLAM uses.",
        "embedding": "Self-consistency: this many forward passes with the encoder's dropout on (0 = none).",
    },
    "temperature": {
        "*": "Sampling temperature of the `samples` answers.",
        "embedding": "Softmax temperature over the cosine similarities (lower: sharper).",
    },
    "top_p": "Nucleus sampling of the `samples` answers.",
    "max_tokens": "Longest sampled answer (tokens), for `samples`.",
    "max_new_tokens": "Longest sampled answer (tokens), for `samples`.",
    "seed": {
        "*": "Random seed of the sampled answers.",
        "openai": "Random seed sent with sampling requests (servers may ignore it).",
        "embedding": "Random seed of the dropout passes.",
    },
    "concurrency": "Parallel requests to the server.",
    "timeout": "Seconds a request may take.",
    "max_retries": "Retries of a failed request (429, 5xx, connection errors), with exponential backoff.",
    "backoff": "First retry delay in seconds (doubled each time, with jitter; `Retry-After` wins).",
    "max_total_s": "Seconds all retries of one request may take together.",
    "batch_size": "Texts handed over per call (and per cache transaction); for in-process models also the "
                  "forward pass's batch.",
    "prompts_per_request": "`scoring = \"echo\"`: prompts per request when the server takes a list.",
    "extra_body": "A table of extra fields sent in every request (server-specific options).",
    "usd_per_mtok_prompt": "Price per million prompt tokens, for `molal annotate --estimate` and budgets (not "
                           "sent anywhere).",
    "usd_per_mtok_completion": "Price per million generated tokens, as above.",
    "max_length": {
        "hf": "Longest prompt in tokens (longer prompts keep their end).",
        "embedding": "Tokens of each text the encoder reads (the rest is cut before tokenising).",
    },
    "device": "`auto` (CUDA when available), `cpu`, `cuda`, `cuda:1`, ….",
    "dtype": "`auto` (bfloat16 on a GPU, float32 on a CPU), `float32`, `float16` or `bfloat16`.",
    "reuse_prompt_cache": "`scoring = \"full\"`: run the prompt once and reuse its KV cache for every class "
                          "(false: every prompt+class sequence in full).",
    "max_model_len": "vLLM's context length.",
    "gpu_memory_utilization": "Share of the GPU's memory vLLM may take.",
    "tensor_parallel_size": "GPUs one model is split over.",
    "enable_prefix_caching": "Let vLLM reuse the KV blocks of a text's prompt across its classes.",
    "templates": "The class prompts embedded for each class, with `{label}` and/or `{description}` (a "
                 "template with `{description}` falls back to the class name for a class without one); a "
                 "class's embedding is the mean of its templates'. Only a template with `{description}` "
                 "uses the descriptions (the default mixture adds the scorer `emb-desc`, "
                 "`[\"{description}\"]`, when the classes are described).",
    "text_template": "How the text is wrapped before it is embedded (`{text}`).",
    "source": "The recording: `bundled:trec`, an `.npz` of `molal annotate`, or a recorded JSONL.",
    "llm": "The recorded LLM to serve when the recording holds several (default: the only one).",
    "classes": "A recorded JSONL's class list (an `.npz` carries its own).",
}

#: the mixture file's own fields (beside the ``[[annotator]]`` tables)
MIXTURE_FIELDS: dict[str, str] = {
    "descriptions": "A table class -> one line saying what the class means; every member gets it (LLM prompts, "
                    "scorer label texts) and it is part of the cache key. In Label Studio a `<Choice hint>` "
                    "does the same and wins; a preset's descriptions are the fallback. Also accepted as "
                    "`[mixture] descriptions`.",
    "task": "One line that frames the task in every LLM prompt (Label Studio: the project's labelling "
            "instructions, setting `instructions`). Also accepted as `[mixture] task`.",
}


def options() -> dict[str, dict[str, inspect.Parameter]]:
    """Annotator type -> its options (the constructor's parameters) in order."""
    out = {}
    for t in ANNOTATOR_TYPES:
        params = inspect.signature(_annotator_class(t).__init__).parameters
        out[t] = {n: p for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}
    return out


def meaning(option: str, type_: str) -> str | None:
    doc = OPTION_DOCS.get(option)
    if isinstance(doc, dict):
        return doc.get(type_, doc.get("*"))
    return doc


def undocumented() -> list[str]:
    """``type.option`` for every option without a meaning (a test keeps this empty)."""
    return [f"{t}.{o}" for t, opts in options().items() for o in opts if not meaning(o, t)]


def _type_name(p: inspect.Parameter) -> str:
    ann = p.annotation
    if ann is inspect.Parameter.empty:
        return ""
    text = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
    return text.replace("typing.", "").replace("Sequence[str] | str", "list[str] | str")


def _default(p: inspect.Parameter) -> str:
    if p.default is inspect.Parameter.empty:
        return "required"
    d: Any = p.default
    if isinstance(d, tuple):
        d = list(d)
    if d is None:
        return "–"
    if isinstance(d, bool):
        return "true" if d else "false"
    if isinstance(d, str):
        return f'"{d}"'
    return repr(d)


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown() -> str:
    """The reference as Markdown (docs/annotators.md)."""
    from molal.annotators.presets import PRESETS

    opts = options()
    lines = [
        "# Annotator options and prompt presets",
        "",
        "<!-- generated by `molal annotators --output docs/annotators.md` from molal/annotators/reference.py and "
        "the annotators' constructors: do not edit by hand -->",
        "",
        "A mixture file (TOML or YAML) lists its members as `[[annotator]]` tables; each takes the options of its "
        "`type` below (any other field is an error naming the allowed ones). Options with a default may be "
        "left out. See README.md, \"Configuring the mixture\".",
        "",
        "## Annotator types",
        "",
        "| type | what |",
        "|---|---|",
        *[f"| `{t}` | {_cell(TYPE_DOCS[t])} |" for t in ANNOTATOR_TYPES],
        "",
        "## The mixture file's own fields",
        "",
        "| field | what |",
        "|---|---|",
        *[f"| `{k}` | {_cell(v)} |" for k, v in MIXTURE_FIELDS.items()],
        "",
    ]
    for t in ANNOTATOR_TYPES:
        lines += [f"## `type = \"{t}\"`", "", _cell(TYPE_DOCS[t]) + ".", "",
                  "| option | type | default | meaning |", "|---|---|---|---|"]
        for name, p in opts[t].items():
            lines.append(f"| `{name}` | `{_cell(_type_name(p))}` | {_cell(_default(p))} | "
                         f"{_cell(meaning(name, t) or '')} |")
        lines.append("")
    every = sorted({o for v in opts.values() for o in v})
    lines += ["## Which types take each option", "", "| option | " + " | ".join(ANNOTATOR_TYPES) + " |",
              "|---|" + "---|" * len(ANNOTATOR_TYPES)]
    for o in every:
        lines.append(f"| `{o}` | " + " | ".join("✓" if o in opts[t] else "" for t in ANNOTATOR_TYPES) + " |")
    lines += ["", "## Prompt presets", "",
              "`preset = \"<name>\"` on an `openai`, `vllm` or `hf` member brings a dataset's task framing (its "
              "system message and template) and class descriptions. Options given explicitly win; class "
              "descriptions from Label Studio's hints or the mixture file's `descriptions` win per class. "
              "Own data has no preset: describe its classes instead.", ""]
    for name, p in PRESETS.items():
        lines += [f"### `{name}`", "", f"* system: {_cell(p['system'])}",
                  f"* template: `{_cell(p['template'])}`"]
        desc = p.get("descriptions") or {}
        if desc:
            lines.append("* descriptions:")
            lines += [f"  * `{c}`: {_cell(d)}" for c, d in desc.items()]
        else:
            lines.append("* descriptions: none (the class names describe themselves)")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["MIXTURE_FIELDS", "OPTION_DOCS", "TYPE_DOCS", "markdown", "meaning", "options", "undocumented"]
