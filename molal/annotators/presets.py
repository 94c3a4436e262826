"""Prompt presets per dataset: how the task is framed and what each class means, as the paper gives each
dataset its own prompt. Written for molal (not copied from the paper's code).

An LLM annotator takes one with ``preset = "<name>"`` in its mixture spec; the preset's template, system
message and class descriptions apply, and any of ``template``, ``system``, ``answer_prefix``,
``verbalizers``, ``examples`` given in the spec override them (the mixture's own ``descriptions`` override
the preset's per class). :data:`PRESETS` names them; a preset's classes are the dataset's
(:data:`molal.datasets.CLASS_NAMES`).
"""

from __future__ import annotations

from typing import Any

_ANSWER = "Answer with the category name only."

PRESETS: dict[str, dict[str, Any]] = {
    "trec": {
        "system": "You classify questions by the kind of answer they expect.",
        "template": ("What kind of answer does this question expect? Choose exactly one of: {labels}.\n"
                     "{descriptions}{examples}Question: {text}\n" + _ANSWER),
        "descriptions": {
            "abbreviation": "the question asks what an abbreviation stands for, or for the abbreviation of something",
            "entity": "the answer is a thing: an animal, a product, an event, a substance, a word, a colour, a sport",
            "description": "the answer is a definition, a description, a reason or a manner (what is X, why, how)",
            "human": "the answer is a person, a group of people or an organisation",
            "location": "the answer is a place: a city, a country, a mountain, an address",
            "numeric": "the answer is a number: a date, a count, a distance, a price, a percentage, a period",
        },
    },
    "ag_news": {
        "system": "You sort news articles into sections.",
        "template": ("Which section of a newspaper does this article belong in? Choose exactly one of: {labels}.\n"
                     "{descriptions}{examples}Article: {text}\n" + _ANSWER),
        "descriptions": {
            "World": "international affairs, politics, conflicts and diplomacy",
            "Sports": "sport events, teams, athletes and results",
            "Business": "companies, markets, the economy, finance and trade",
            "Sci/Tech": "science, technology, computing, the internet, space and health research",
        },
    },
    "sst2": {
        "system": "You judge the sentiment of short movie review excerpts.",
        "template": ("Is the sentiment of this movie review excerpt {labels}?\n{descriptions}{examples}"
                     "Excerpt: {text}\n" + _ANSWER),
        "descriptions": {
            "negative": "the writer dislikes the film or this aspect of it",
            "positive": "the writer likes the film or this aspect of it",
        },
    },
    "imdb": {
        "system": "You judge the sentiment of movie reviews.",
        "template": ("Overall, is this movie review {labels}?\n{descriptions}{examples}Review: {text}\n" + _ANSWER),
        "descriptions": {
            "negative": "the reviewer's overall verdict on the film is unfavourable",
            "positive": "the reviewer's overall verdict on the film is favourable",
        },
    },
    "pubmed-20k-rct": {
        "system": "You label the role of sentences in abstracts of randomized controlled trials.",
        "template": ("What role does this sentence play in the abstract of a medical trial? Choose exactly one of: "
                     "{labels}.\n{descriptions}{examples}Sentence: {text}\n" + _ANSWER),
        "descriptions": {
            "background": "context and prior knowledge that motivate the study",
            "objective": "the aim or hypothesis of the study",
            "method": "how the study was done: design, participants, interventions, measurements",
            "result": "what was found: outcomes, numbers, statistical tests",
            "conclusion": "what the authors conclude or recommend from the findings",
        },
    },
    "banking77": {  # 77 fine-grained intents: the framing only (class names are self-describing)
        "system": "You route customer messages of a bank to the right intent.",
        "template": ("Which intent does this customer message express? Choose exactly one of: {labels}.\n"
                     "{descriptions}{examples}Message: {text}\n" + _ANSWER),
        "descriptions": {},
    },
}


def preset(name: str) -> dict[str, Any]:
    """A copy of preset ``name`` (ValueError naming the known presets otherwise)."""
    if name not in PRESETS:
        raise ValueError(f"unknown prompt preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    p = PRESETS[name]
    return {**p, "descriptions": dict(p.get("descriptions", {}))}


__all__ = ["PRESETS", "preset"]
