"""What a reviewer sees of molal in Label Studio: task data fields, the opt-in review panel in the label
config, and the labeling instructions.

**Fields** (written into a task's data by the training job, in the same request as its priority, for the
tasks at the head of the queue: every task whose priority is written; a new model removes them from tasks
that left the head). The Data Manager can show, sort and filter them; the review panel displays
``molal_review``:

==================  ====================================================================================
``molal_label``      the label molal pre-fills (the serving model's top class: MoLAM's, or the student's)
``molal_confidence`` its probability, 0–1 (2 decimals)
``molal_votes``      the LLMs' votes, most voted first: ``description 5/5`` or ``entity 3/5 · human 2/5``
``molal_agreement``  the share of LLMs that vote the most-voted label, 0–1
``molal_flag``       ``overrides LLMs`` where molal's label differs from the LLMs' majority (a label more than
                     half of them vote), else empty: a split or a tie has no majority to override
``molal_uncertainty`` the student's predictive entropy, 0 (sure) – 1 (uniform): what uncertainty-based
                     query strategies rank by
``molal_review``     one line for people: the pre-fill, its confidence, the votes, and what they say of it
                     ("overrides the LLMs' majority (x)", "no majority", "no majority (tied: a, b)")
==================  ====================================================================================

**Review panel** (opt-in: ``molal project review-panel --project N``, or the project setting
``review_panel=true``): a read-only block at the top of the label config that shows ``$molal_review``
above the text. It adds no control tag, so it never enters an annotation or an export, and leaves the
``<Choices>`` and every annotation alone. It sits between two XML comments, so it can be removed exactly.
An XML parser (expat) says where it goes and where it is; the text around it is never rewritten, and the
edited config is parsed again (:func:`check_edit`) before anything sends it to Label Studio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FIELDS = ("molal_label", "molal_confidence", "molal_votes", "molal_agreement", "molal_flag", "molal_uncertainty",
          "molal_review")
OVERRIDE_FLAG = "overrides LLMs"
PANEL_BEGIN = "<!-- molal:review-panel -->"
PANEL_END = "<!-- /molal:review-panel -->"
PANEL = (
    f"{PANEL_BEGIN}<View style=\"padding: 6px 10px; margin-bottom: 8px; background: #f4f6fb; border-left: 4px solid "
    f"#5b7bd5\"><Header value=\"$molal_review\" size=\"6\" underline=\"false\"/></View>{PANEL_END}"
)
INSTRUCTIONS = (
    "<p><b>Pre-filled labels come from molal</b>, not from a person: MoLAM, a model that combines several "
    "LLMs, suggests one class per task. The line above each text says how sure it is (its probability), "
    "how the LLMs voted, and flags <i>overrides LLMs</i> where MoLAM's label differs from a label more than "
    "half of the LLMs voted for: look at those twice. Where the LLMs are split it says <i>no majority</i>."
    "</p><p>Accept the pre-filled label if it is right, change it if it is not, then "
    "submit. Every submitted label is a person's label: the next training round learns from it.</p>"
)


class VoteSummary:
    """How the members voted on one task: the votes as text (most voted first), the most-voted classes, and
    the majority — a class voted by more than half of the voters, or None (a split, or a tie)."""

    __slots__ = ("text", "top", "top_count", "majority", "n")

    def __init__(self, llm_labels: Sequence[int], classes: Sequence[str]) -> None:
        counts = np.bincount(np.asarray(llm_labels, dtype=np.int64), minlength=len(classes))
        order = sorted(range(len(classes)), key=lambda c: (-counts[c], c))
        self.n = len(llm_labels)
        self.text = " · ".join(f"{classes[c]} {counts[c]}/{self.n}" for c in order if counts[c] > 0)
        self.top_count = int(counts[order[0]]) if self.n else 0
        self.top = [c for c in order if self.top_count and counts[c] == self.top_count]  # the most voted (ties)
        self.majority = self.top[0] if self.top and 2 * self.top_count > self.n else None

    def relation(self, label: int, classes: Sequence[str], voters: str) -> str:
        """What the review line says of the pre-filled ``label`` against these votes ("" when it is the
        majority's): overrides a real majority, or that there is none (and the tie, if any)."""
        if self.majority is not None:
            if self.majority == label:
                return ""
            whose = f"the {voters}'s vote" if self.n == 1 else f"the {voters}s' majority"
            return f"overrides {whose} ({classes[self.majority]})"
        if len(self.top) > 1:
            return "no majority (tied: " + ", ".join(classes[c] for c in self.top) + ")"
        return "no majority"


def voters_of(member_versions: list[str]) -> str:
    """What the review line calls the mixture's members: "LLM", "scorer" (embedding scorers), or "member"."""
    kinds = {v.split(":", 1)[0] for v in member_versions}
    return {"llm": "LLM", "scorer": "scorer"}.get(next(iter(kinds)), "member") if len(kinds) == 1 else "member"


def review_fields(served: np.ndarray, llm_probs: np.ndarray | None, classes: Sequence[str],
                  student: np.ndarray | None = None, voters: str = "LLM") -> list[dict]:
    """The fields of the module docstring for n tasks: ``served`` (n, K) the pre-fill's probabilities,
    ``llm_probs`` (n, L, K) each LLM's (None: no LLM votes, e.g. a student-only project), ``student`` (n, K)
    the student's (for the uncertainty; None: left out). ``voters`` names the members in the review line:
    ``"LLM"``, or ``"scorer"`` / ``"member"`` when embedding scorers vote (they are not LLMs).

    A majority is more than half of the voters: the flag (``molal_flag``) and "overrides …" are written only
    where the pre-fill differs from a real majority; where there is none the line says "no majority", and
    names the classes tied for the most votes."""
    served = np.asarray(served, dtype=np.float64)
    k = len(classes)
    out = []
    for i in range(len(served)):
        lab = int(served[i].argmax())
        conf = float(served[i, lab])
        f: dict = {"molal_label": classes[lab], "molal_confidence": round(conf, 2)}
        review = f"molal pre-filled {classes[lab]} ({conf:.0%})"
        if llm_probs is not None and np.asarray(llm_probs).shape[1] > 0:
            v = VoteSummary(np.asarray(llm_probs[i]).argmax(axis=1), classes)
            f["molal_votes"] = v.text
            f["molal_agreement"] = round(v.top_count / v.n, 2)
            f["molal_flag"] = OVERRIDE_FLAG if v.majority is not None and v.majority != lab else ""
            review += f" · {voters} votes: {v.text}"
            if rel := v.relation(lab, classes, voters):
                review += f" · {rel}"
        if student is not None:
            p = np.clip(np.asarray(student[i], dtype=np.float64), 1e-12, 1.0)
            f["molal_uncertainty"] = round(float(-(p * np.log(p)).sum() / np.log(k)), 2) if k > 1 else 0.0
        f["molal_review"] = review
        out.append(f)
    return out


# -- the review panel -------------------------------------------------------------------------------------
class ReviewPanelError(ValueError):
    """The review panel cannot go into (or come out of) this label config; the message says why."""


_BEGIN, _END = PANEL_BEGIN[4:-3], PANEL_END[4:-3]  # the comments' text


@dataclass
class _Layout:
    """Where things are in a label config, from an XML parser (byte offsets into its UTF-8 encoding)."""

    root: str  # the root element's name
    body: int  # just after the root's start tag (-1: the root is empty, ``<View/>``)
    panels: list[tuple[int, int]]  # each review panel among the root's children: its first and past-last byte


def _layout(config: str) -> tuple[bytes, _Layout]:
    """Parse ``config`` as XML (expat: no DTD read, no entity declared or expanded, nothing fetched) and say
    where its root's content begins and where the review panels are. A config that is not well-formed XML, or
    declares entities, raises :class:`ReviewPanelError`."""
    from xml.parsers import expat

    data = config.encode("utf-8")
    p = expat.ParserCreate(encoding="utf-8")  # the text is UTF-8 whatever its declaration says
    p.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    depth, root, start = 0, None, -1
    begins: list[int] = []
    panels: list[tuple[int, int]] = []

    def on_start(name, _attrs):
        nonlocal depth, root, start
        if depth == 0:
            root, start = name, p.CurrentByteIndex
        depth += 1

    def on_end(_name):
        nonlocal depth
        depth -= 1

    def on_comment(text):
        if depth != 1:  # only the root's own children: a comment before the root, or deeper, is the user's
            return
        at = p.CurrentByteIndex
        if text == _BEGIN:
            begins.append(at)
        elif text == _END and begins:
            panels.append((begins.pop(), at + len(PANEL_END.encode())))

    def no_entities(*_a):
        raise ReviewPanelError("the label config declares XML entities; molal does not edit such a config")

    p.StartElementHandler, p.EndElementHandler, p.CommentHandler = on_start, on_end, on_comment
    p.EntityDeclHandler = no_entities
    try:
        p.Parse(data, True)
    except expat.ExpatError as exc:
        raise ReviewPanelError(f"the label config is not well-formed XML ({expat.ErrorString(exc.code)}, line "
                               f"{exc.lineno}, column {exc.offset})") from None
    if root is None:
        raise ReviewPanelError("the label config has no root element")
    if begins:
        raise ReviewPanelError("the label config has a review panel that begins but does not end "
                               f"({PANEL_BEGIN} without {PANEL_END}); remove it by hand")
    return data, _Layout(root, _start_tag_end(data, start), panels)


def _start_tag_end(data: bytes, start: int) -> int:
    """Just after the start tag at ``start`` of well-formed XML (a ``>`` in a quoted attribute value is not
    its end), or -1 when the tag closes itself (``<View/>``)."""
    quote = None
    for i in range(start, len(data)):
        c = data[i]
        if quote is not None:
            if c == quote:
                quote = None
        elif c in (0x22, 0x27):  # " '
            quote = c
        elif c == 0x3E:  # >
            return -1 if data[i - 1] == 0x2F else i + 1  # /
    raise ReviewPanelError("the label config's root start tag does not end")  # cannot happen once parsed


def has_review_panel(config: str) -> bool:
    """Whether the root ``<View>`` of ``config`` holds the review panel (as one of its children)."""
    return bool(_layout(config)[1].panels)


def add_review_panel(config: str) -> str:
    """``config`` with the review panel as the first child of its root ``<View>`` (unchanged if present).

    The XML parser finds where the root's start tag ends; the panel goes in there and nothing else in the
    text changes (comments, attribute order and quoting, whitespace, entities, the prolog): removing it gives
    back exactly ``config``. :class:`ReviewPanelError` when the config is not well-formed XML, declares
    entities, or has no root ``<View>`` with content."""
    data, lay = _layout(config)
    if lay.panels:
        return config
    if lay.root != "View":
        raise ReviewPanelError(f"the label config's root is <{lay.root[:40]}>, not the root <View> the review "
                               "panel goes in")
    if lay.body < 0:
        raise ReviewPanelError("the label config's root <View/> is empty")
    return (data[: lay.body] + PANEL.encode() + data[lay.body :]).decode("utf-8")


def remove_review_panel(config: str) -> str:
    """``config`` without the review panel: exactly the text :func:`add_review_panel` started from."""
    data, lay = _layout(config)
    for a, b in reversed(lay.panels):
        data = data[:a] + data[b:]
    return data.decode("utf-8") if lay.panels else config


def check_edit(before: str, after: str) -> None:
    """Refuse (:class:`ReviewPanelError`) an edited label config that Label Studio could not use as the
    original was: ``after`` must parse (molal's parser and the Label Studio SDK's, with its validation where
    ``before`` passes it) and serve the same ``<Choices>``, ``<Text>`` and classes."""
    from label_studio_sdk.label_interface import LabelInterface

    from molal.service.labelconfig import LabelConfigError, parse_label_config

    spec = parse_label_config(before)  # LabelConfigError: not a config molal serves, edited or not
    _layout(after)
    try:
        same = parse_label_config(after) == spec
    except LabelConfigError as exc:
        raise ReviewPanelError(f"the edited label config would not parse: {exc}") from None
    if not same:
        raise ReviewPanelError("the edited label config would serve other classes or another <Choices>")

    def invalid(config: str) -> str | None:
        try:
            LabelInterface(config).validate()
        except Exception as exc:  # noqa: BLE001 - the SDK raises assorted errors
            return f"{type(exc).__name__}: {str(exc)[:200]}"
        return None

    why = invalid(after)
    if why is not None and invalid(before) is None:
        raise ReviewPanelError(f"Label Studio would refuse the edited label config ({why})")


__all__ = ["FIELDS", "INSTRUCTIONS", "OVERRIDE_FLAG", "PANEL", "ReviewPanelError", "VoteSummary", "add_review_panel", "check_edit",
           "has_review_panel", "remove_review_panel", "review_fields", "voters_of"]
