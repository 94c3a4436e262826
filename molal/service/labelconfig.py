"""Label Studio label config → what molal needs: the Choices tag, its Text target and the class list.

Supported: a ``<Choices>`` tag with single choice (``choice="single"`` or ``"single-radio"``, the default)
whose ``toName`` is a ``<Text>`` tag. With several Choices blocks the first one with a Text target is
used, or the one named by ``from_name``. Anything else raises :class:`LabelConfigError` (HTTP 422 in the
backend) with a message that names what is supported.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

#: defaults of the limits (the backend passes its own: MOLAL_MAX_CLASSES, MOLAL_MAX_LABEL_CONFIG_CHARS)
DEFAULT_MAX_CLASSES = 200
DEFAULT_MAX_CONFIG_CHARS = 200_000
#: longest class name (a <Choice> value, or its alias); longer ones would bloat every prompt and result
MAX_CLASS_CHARS = 200

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


def _raw_choices(config: str, name: str) -> list[str] | None:
    """The class names of ``<Choices name=name>`` as written (``alias`` if set, else ``value``), duplicates and
    empty values included — the SDK's parser drops both silently. None if the XML cannot be read here."""
    try:
        root = ET.fromstring(config)
    except ET.ParseError:
        return None
    for el in root.iter("Choices"):
        if el.get("name") == name:
            return [c.get("alias") if c.get("alias") is not None else (c.get("value") or "") for c in el.iter("Choice")]
    return None


def parse_label_config(config: object, from_name: str | None = None, *, max_classes: int = DEFAULT_MAX_CLASSES,
                       max_chars: int = DEFAULT_MAX_CONFIG_CHARS) -> LabelSpec:
    """Parse a label config XML string into a :class:`LabelSpec` or raise :class:`LabelConfigError`.

    Refused with a message: a config over ``max_chars`` characters, a ``<Choices>`` with more than
    ``max_classes`` values, duplicate or empty values, a value over ``MAX_CLASS_CHARS`` characters."""
    if not isinstance(config, str) or not config.strip():
        raise LabelConfigError(f"the label config is missing or empty; {SUPPORTED}")
    if len(config) > max_chars:
        raise LabelConfigError(f"the label config has {len(config)} characters; molal accepts at most {max_chars} "
                               "(MOLAL_MAX_LABEL_CONFIG_CHARS)")
    try:
        from label_studio_sdk.label_interface import LabelInterface

        li = LabelInterface(config)
    except Exception as exc:  # the SDK raises assorted errors on bad XML
        raise LabelConfigError(f"the label config cannot be parsed ({type(exc).__name__}: {exc}); {SUPPORTED}") from None
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
    for c in candidates:
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
        raw = _raw_choices(config, c.name)
        labels = raw if raw is not None else [str(v) for v in (c.labels or [])]
        if len(labels) > max_classes:
            problems.append(f"<Choices name={c.name!r}> has {len(labels)} <Choice> values; molal serves at most "
                            f"{max_classes} classes (MOLAL_MAX_CLASSES)")
            continue
        empty = [i + 1 for i, v in enumerate(labels) if not v.strip()]
        if empty:
            problems.append(f"<Choices name={c.name!r}> has an empty <Choice value> (choice number {empty[0]})")
            continue
        dup = sorted({v for v in labels if labels.count(v) > 1})
        if dup:
            problems.append(f"<Choices name={c.name!r}> has duplicate <Choice> values: "
                            f"{', '.join(repr(v[:40]) for v in dup[:5])} (each class must appear once)")
            continue
        long_ = [v for v in labels if len(v) > MAX_CLASS_CHARS]
        if long_:
            problems.append(f"<Choices name={c.name!r}> has a <Choice> value of {len(long_[0])} characters "
                            f"(at most {MAX_CLASS_CHARS})")
            continue
        if len(labels) < 2:
            problems.append(f"<Choices name={c.name!r}> has {len(labels)} <Choice> values (need at least 2)")
            continue
        text = text_targets[0]
        value = str(text.value or "")
        if not value.startswith("$") or len(value) < 2:
            problems.append(f"<Text name={text.name!r}> has value={value!r}; it must name a task field like $text")
            continue
        return LabelSpec(from_name=c.name, to_name=text.name, value_key=value[1:], classes=tuple(labels))
    raise LabelConfigError("; ".join(problems) + f". {SUPPORTED}")
