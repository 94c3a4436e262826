"""Label Studio label config → what molal needs: the Choices tag, its Text target and the class list.

Supported: a ``<Choices>`` tag with single choice (``choice="single"`` or ``"single-radio"``, the default)
whose ``toName`` is a ``<Text>`` tag. With several Choices blocks the first one with a Text target is
used, or the one named by ``from_name``. Anything else raises :class:`LabelConfigError` (HTTP 422 in the
backend) with a message that names what is supported.

What the team wrote about its classes and task reaches the LLMs' prompts and the scorers' label texts:

* a ``<Choice>``'s ``hint`` (the tooltip Label Studio shows) is that class's description; with an ``alias``
  (then the class is the alias, the name results carry) the ``value`` people see describes it too
  (:attr:`LabelSpec.descriptions`);
* the project's labelling instructions can frame the task (:func:`task_framing`): molal's own text in them
  (its status block, the review panel's instructions) is never used; short instructions are used by
  default, long ones when the project opts in (setting ``instructions``).
"""

from __future__ import annotations

import time
import unicodedata
import xml.etree.ElementTree as ET
from dataclasses import dataclass

#: defaults of the limits (the backend passes its own: MOLAL_MAX_CLASSES, MOLAL_MAX_LABEL_CONFIG_CHARS)
DEFAULT_MAX_CLASSES = 200
DEFAULT_MAX_CONFIG_CHARS = 200_000
#: longest class name (a <Choice> value, or its alias); longer ones would bloat every prompt and result
MAX_CLASS_CHARS = 200
#: longest class description (a <Choice>'s hint, with its value when it has an alias), once its whitespace is
#: collapsed; longer ones are refused (each goes into every prompt)
MAX_DESCRIPTION_CHARS = 1000
#: the longest labelling instructions used as the task framing without opting in (characters of text, molal's
#: own text removed); ``instructions = "on"`` uses longer ones, cut at ``MAX_TASK_CHARS``
SHORT_INSTRUCTIONS_CHARS = 500
#: the project setting ``instructions``: when the labelling instructions frame the LLMs' task
INSTRUCTIONS_MODES = ("auto", "on", "off")

SUPPORTED = (
    "molal supports a <Choices> tag with choice=\"single\" (or single-radio) whose toName is a <Text> tag, "
    "e.g. <View><Text name=\"text\" value=\"$text\"/><Choices name=\"label\" toName=\"text\" choice=\"single\">"
    "<Choice value=\"A\"/><Choice value=\"B\"/></Choices></View>"
)


class LabelConfigError(ValueError):
    """The label config is not one molal can serve (message names what is supported)."""


@dataclass(frozen=True)
class LabelSpec:
    """The part of a label config molal uses."""

    from_name: str  # the Choices tag name (goes into every result)
    to_name: str  # the Text tag name
    value_key: str  # task["data"][value_key] is the text
    classes: tuple[str, ...]  # ordered class names (the order of the <Choice> tags)
    #: (class, description) of each described class: its ``hint``, after its ``value`` when it has an alias
    descriptions: tuple[tuple[str, str], ...] = ()
    #: the project's labelling instructions (HTML) as a job read them from Label Studio; None: not read (the
    #: label config does not hold them; /predict uses the framing stored with the serving model)
    instructions: str | None = None

    @property
    def description_map(self) -> dict[str, str]:
        """class -> description, for the classes the label config describes."""
        return dict(self.descriptions)

    def result(self, label: str, score: float | None = None) -> dict:
        """One ``choices`` result item for ``label``."""
        out = {
            "from_name": self.from_name,
            "to_name": self.to_name,
            "type": "choices",
            "value": {"choices": [label]},
        }
        if score is not None:
            out["score"] = float(score)
        return out


def _raw_choices(config: str) -> dict[str, list[tuple[str, str]]] | None:
    """The class names of every ``<Choices name=...>`` as written (``alias`` if set, else ``value``), duplicates
    and empty values included — the SDK's parser drops both silently — each with its description (see
    :func:`choice_description`). One parse for all of them (one per ``<Choices>`` made 3,000 of them cost
    50 s). None if the XML cannot be read here."""
    try:
        root = ET.fromstring(config)
    except ET.ParseError:
        return None
    out: dict[str, list[tuple[str, str]]] = {}
    for el in root.iter("Choices"):
        name = el.get("name")
        if name is not None and name not in out:  # the first of a name, as the SDK keeps
            out[name] = [(c.get("alias") if c.get("alias") is not None else (c.get("value") or ""),
                          choice_description(c.get("value"), c.get("alias"), c.get("hint")))
                         for c in el.iter("Choice")]
    return out


def choice_description(value: str | None, alias: str | None, hint: str | None) -> str:
    """What a ``<Choice>`` says about its class beyond its name: its ``value`` when an ``alias`` is the class
    name (the words people see), then its ``hint``; whitespace collapsed ("" for none)."""
    parts = []
    v = " ".join((value or "").split())
    if alias is not None and v and v != " ".join(alias.split()):
        parts.append(v)
    h = " ".join((hint or "").split())
    if h and h not in parts:
        parts.append(h)
    return ": ".join(parts)


#: refused in class names: controls (C0, C1, DEL), line and paragraph separators, surrogates, and the format
#: characters — bidi controls (U+202A–E, U+2066–9, U+200E/F, U+061C), zero-width spaces and joiners, soft
#: hyphens, BOMs: invisible, or reordering what a reviewer reads — except ZWNJ and ZWJ (U+200C/D), which
#: Persian, Indic scripts and emoji sequences need
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_ALLOWED_FORMAT = frozenset({"\u200c", "\u200d"})


def refused_char(name: str) -> str | None:
    """The first character of a class name that molal refuses, as ``U+XXXX NAME`` (never the raw character),
    or None."""
    for ch in name:
        if unicodedata.category(ch) in _REFUSED_CATEGORIES and ch not in _ALLOWED_FORMAT:
            return f"U+{ord(ch):04X} {unicodedata.name(ch, 'control character')}"
    return None


def class_key(name: str) -> str:
    """What makes two class names the same class: the name without surrounding spaces, in Unicode NFC."""
    return unicodedata.normalize("NFC", name.strip())


def _check_classes(labels: list[str], where: str) -> str | None:
    """Why a ``<Choices>``'s class names cannot be served (None: they can)."""
    empty = [i + 1 for i, v in enumerate(labels) if not v.strip()]
    if empty:
        return f"{where} has an empty <Choice value> (choice number {empty[0]})"
    long_ = [v for v in labels if len(v) > MAX_CLASS_CHARS]
    if long_:
        return f"{where} has a <Choice> value of {len(long_[0])} characters (at most {MAX_CLASS_CHARS})"
    for i, v in enumerate(labels):
        bad = refused_char(v)
        if bad is not None:
            return (f"{where} has a control or invisible formatting character ({bad}) in <Choice> number {i + 1}; "
                    "class names are shown to reviewers as written: remove it")
    first: dict[str, int] = {}
    dups: list[tuple[int, int]] = []
    for i, v in enumerate(labels):
        j = first.setdefault(class_key(v), i)
        if j != i:
            dups.append((j, i))
    if dups:
        names = list(dict.fromkeys(class_key(labels[j]) for j, _ in dups))
        same_text = all(labels[j] == labels[i] for j, i in dups)
        how = "" if same_text else (" (the same class once surrounding spaces are trimmed and Unicode is "
                                    f"normalised: choices number {dups[0][0] + 1} and {dups[0][1] + 1})")
        return (f"{where} has duplicate <Choice> values: {', '.join(repr(v[:40]) for v in names[:5])}{how} "
                "(each class must appear once)")
    return None


def parse_label_config(config: object, from_name: str | None = None, *, max_classes: int = DEFAULT_MAX_CLASSES,
                       max_chars: int = DEFAULT_MAX_CONFIG_CHARS, budget_s: float | None = None) -> LabelSpec:
    """Parse a label config XML string into a :class:`LabelSpec` or raise :class:`LabelConfigError`.

    Refused with a message: a config over ``max_chars`` characters, a ``<Choices>`` with more than
    ``max_classes`` values, empty values, values that are the same class (:func:`class_key`: surrounding
    spaces, Unicode normalisation), a value with a control or invisible formatting character
    (:func:`refused_char`), a value over ``MAX_CLASS_CHARS`` characters, and — with ``budget_s`` — a config
    whose parsing takes longer than that (checked after the SDK's parse and between ``<Choices>`` blocks)."""
    from label_studio_sdk.label_interface import LabelInterface  # ~3 s cold: not parsing time

    deadline = None if budget_s is None else time.monotonic() + budget_s

    def in_time() -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise LabelConfigError(f"parsing the label config took over {budget_s:g} s, the budget for a new label "
                                   "config (MOLAL_LABEL_CONFIG_BUDGET_S); simplify it (fewer tags)")

    if not isinstance(config, str) or not config.strip():
        raise LabelConfigError(f"the label config is missing or empty; {SUPPORTED}")
    if len(config) > max_chars:
        raise LabelConfigError(f"the label config has {len(config)} characters; molal accepts at most {max_chars} "
                               "(MOLAL_MAX_LABEL_CONFIG_CHARS)")
    try:
        li = LabelInterface(config)
    except Exception as exc:  # the SDK raises assorted errors on bad XML
        raise LabelConfigError(f"the label config cannot be parsed ({type(exc).__name__}: {exc}); {SUPPORTED}") from None
    in_time()
    objects = {o.name: o for o in li.objects}
    choices = [c for c in li.controls if c.tag.lower() == "choices"]
    if not choices:
        tags = sorted({c.tag for c in li.controls}) or ["none"]
        raise LabelConfigError(f"the label config has no <Choices> tag (control tags: {', '.join(tags)}); {SUPPORTED}")
    if from_name is not None:
        picked = [c for c in choices if c.name == from_name]
        if not picked:
            raise LabelConfigError(
                f"no <Choices name={from_name!r}> in the label config (have {[c.name for c in choices]}); {SUPPORTED}"
            )
        candidates = picked
    else:
        candidates = choices
    problems: list[str] = []
    raw: dict[str, list[str]] | None = None
    for c in candidates:
        in_time()
        targets = [objects.get(t) for t in (c.to_name or [])]
        text_targets = [o for o in targets if o is not None and o.tag.lower() == "text"]
        if not text_targets:
            kinds = [o.tag if o is not None else "missing" for o in targets]
            problems.append(f"<Choices name={c.name!r}> targets {kinds or ['nothing']}, not a <Text> tag")
            continue
        mode = str(c.attr.get("choice", "single")).lower()
        if mode not in ("single", "single-radio"):
            problems.append(f"<Choices name={c.name!r}> has choice={mode!r} (multiple choice is not supported)")
            continue
        if c.attr.get("perRegion") or c.attr.get("perregion"):
            problems.append(f"<Choices name={c.name!r}> is perRegion (not supported)")
            continue
        if raw is None:
            raw = _raw_choices(config) or {}
        described = raw[c.name] if c.name in raw else [(str(v), "") for v in (c.labels or [])]
        labels = [name for name, _ in described]
        if len(labels) > max_classes:
            problems.append(f"<Choices name={c.name!r}> has {len(labels)} <Choice> values; molal serves at most "
                            f"{max_classes} classes (MOLAL_MAX_CLASSES)")
            continue
        why = _check_classes(labels, f"<Choices name={c.name!r}>")
        if why is not None:
            problems.append(why)
            continue
        if len(labels) < 2:
            problems.append(f"<Choices name={c.name!r}> has {len(labels)} <Choice> values (need at least 2)")
            continue
        text = text_targets[0]
        value = str(text.value or "")
        if not value.startswith("$") or len(value) < 2:
            problems.append(f"<Text name={text.name!r}> has value={value!r}; it must name a task field like $text")
            continue
        long_ = [(i, d) for i, (_, d) in enumerate(described) if len(d) > MAX_DESCRIPTION_CHARS]
        if long_:
            problems.append(f"<Choices name={c.name!r}>: the hint of <Choice> number {long_[0][0] + 1} has "
                            f"{len(long_[0][1])} characters (at most {MAX_DESCRIPTION_CHARS}: it goes into every "
                            "LLM prompt; one line per class is the idea)")
            continue
        return LabelSpec(from_name=c.name, to_name=text.name, value_key=value[1:], classes=tuple(labels),
                         descriptions=tuple((n, d) for n, d in described if d))
    more = f"; and {len(problems) - 5} more <Choices> like these" if len(problems) > 5 else ""
    raise LabelConfigError("; ".join(problems[:5]) + f"{more}. {SUPPORTED}")


# -- the labelling instructions as the task framing ------------------------------------------------------------
def _plain_text(html_text: str) -> str:
    """The text of an HTML fragment (tags dropped, entities decoded, block ends as line ends), whitespace
    collapsed per line."""
    from html.parser import HTMLParser

    class _Text(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.parts: list[str] = []
            self.skip = 0

        def handle_starttag(self, tag, attrs):
            if tag in ("script", "style"):
                self.skip += 1
            elif tag in ("br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"):
                self.parts.append("\n")

        def handle_endtag(self, tag):
            if tag in ("script", "style") and self.skip:
                self.skip -= 1

        def handle_data(self, data):
            if not self.skip:
                self.parts.append(data)

    p = _Text()
    p.feed(html_text)
    p.close()
    lines = (" ".join(line.split()) for line in "".join(p.parts).splitlines())
    return "\n".join(line for line in lines if line)


def molal_texts() -> list[str]:
    """molal's own texts that it writes into the labelling instructions (the review panel's instructions), as
    plain text: never framing."""
    from molal.service.review import INSTRUCTIONS

    return [_plain_text(INSTRUCTIONS)]


def task_framing(instructions: str | None, mode: str = "auto") -> tuple[str, str]:
    """The task framing the project's labelling ``instructions`` (HTML, as Label Studio holds them) give the
    LLMs' prompts, and why: ``(framing, reason)``, framing "" for none.

    molal's status block (between ``<!-- molal:status -->`` and ``<!-- /molal:status -->``) is cut out first and
    never used, and so is the review panel's instructions text. ``mode`` (the project setting
    ``instructions``): ``"off"`` never; ``"auto"`` (default) only when what is left is at most
    ``SHORT_INSTRUCTIONS_CHARS`` characters and held none of molal's text; ``"on"`` what is left, cut at
    :data:`molal.annotators.prompts.MAX_TASK_CHARS` characters."""
    from molal.annotators.prompts import MAX_TASK_CHARS
    from molal.service.status import STATUS_BEGIN, STATUS_END

    if mode not in INSTRUCTIONS_MODES:
        raise ValueError(f"instructions must be one of {list(INSTRUCTIONS_MODES)}, got {mode!r}")
    if mode == "off":
        return "", "the project setting instructions=off"
    text = instructions or ""
    while True:  # every status block, however many an edit left
        i = text.find(STATUS_BEGIN)
        j = text.find(STATUS_END, i + 1) if i >= 0 else -1
        if i < 0 or j < 0:
            break
        text = text[:i] + text[j + len(STATUS_END):]
    plain = _plain_text(text)
    had_molal = False
    for own in molal_texts():
        if own and own in plain:
            plain = plain.replace(own, "\n").strip()
            had_molal = True
    plain = " ".join(plain.split())
    if not plain:
        return "", ("the labelling instructions hold only molal's own text" if had_molal or instructions
                    else "the project has no labelling instructions")
    if mode == "auto" and had_molal:
        return "", ("the labelling instructions hold molal's review text besides the team's: set the project "
                    "setting instructions=on to use the team's part")
    if mode == "auto" and len(plain) > SHORT_INSTRUCTIONS_CHARS:
        return "", (f"the labelling instructions are long ({len(plain)} characters > {SHORT_INSTRUCTIONS_CHARS}): "
                    "set the project setting instructions=on to frame the LLMs' task with them")
    if len(plain) > MAX_TASK_CHARS:
        cut = plain[:MAX_TASK_CHARS].rsplit(" ", 1)[0]
        return cut, f"the labelling instructions, cut at {len(cut)} of {len(plain)} characters"
    return plain, "the labelling instructions"
