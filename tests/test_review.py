"""What a reviewer sees of molal (molal.service.review): the task data fields, the opt-in review panel in a
label config, and how the training job writes the fields with the priorities (head of the queue only)."""

from __future__ import annotations

import numpy as np
import pytest

from molal.service.labelconfig import LabelConfigError, parse_label_config
from molal.service.review import (
    FIELDS,
    OVERRIDE_FLAG,
    add_review_panel,
    has_review_panel,
    remove_review_panel,
    review_fields,
)
from tests.conftest import TREC_CLASSES, TREC_CONFIG


def test_fields_say_what_molal_prefilled_how_the_llms_voted_and_when_it_overrides_them():
    classes = TREC_CLASSES
    served = np.array([[0.05, 0.58, 0.30, 0.03, 0.02, 0.02],   # MoLAM: entity 58 %
                       [0.01, 0.01, 0.90, 0.04, 0.02, 0.02]])  # MoLAM: description 90 %
    llm = np.zeros((2, 5, 6))
    llm[0, :, 2] = 1.0  # all five LLMs: description ("What is tyvek ?")
    llm[1, :3, 2] = 1.0
    llm[1, 3:, 1] = 1.0  # three say description, two entity
    student = np.array([[1 / 6] * 6, [1.0, 0, 0, 0, 0, 0]])
    a, b = review_fields(served, llm, classes, student)
    assert a["molal_label"] == "entity" and a["molal_confidence"] == 0.58
    assert a["molal_votes"] == "description 5/5" and a["molal_agreement"] == 1.0
    assert a["molal_flag"] == OVERRIDE_FLAG and "overrides the LLMs' majority (description)" in a["molal_review"]
    assert a["molal_review"].startswith("molal pre-filled entity (58%) · LLM votes: description 5/5")
    assert a["molal_uncertainty"] == 1.0 and b["molal_uncertainty"] == 0.0
    assert b["molal_votes"] == "description 3/5 · entity 2/5" and b["molal_agreement"] == 0.6
    assert b["molal_flag"] == "" and "overrides" not in b["molal_review"]
    assert set(a) == set(FIELDS)
    # embedding scorers are not called LLMs in the line a reviewer reads
    (s,) = review_fields(served[:1], llm[:1], classes, None, voters="scorer")
    assert "scorer votes: description 5/5" in s["molal_review"] and "the scorers' majority" in s["molal_review"]
    # without LLM votes (a project served by its student alone) or without a student: what is known
    (c,) = review_fields(served[:1], None, classes)
    assert set(c) == {"molal_label", "molal_confidence", "molal_review"}


def _votes(*labels: int) -> np.ndarray:
    """One task's (1, L, K) one-hot LLM probabilities from the LLMs' labels."""
    llm = np.zeros((1, len(labels), len(TREC_CLASSES)))
    for j, c in enumerate(labels):
        llm[0, j, c] = 1.0
    return llm


@pytest.mark.parametrize("labels, served, votes, flag, says", [
    # a 5-way split: no class has a majority, nor the most votes alone — nothing to override
    ((0, 1, 2, 3, 4), 0, "abbreviation 1/5 · entity 1/5 · description 1/5 · human 1/5 · location 1/5", "",
     "no majority (tied: abbreviation, entity, description, human, location)"),
    # 2-2-1: the pre-fill is one of the tied classes, or the odd one: no majority either way
    ((1, 1, 3, 3, 2), 3, "entity 2/5 · human 2/5 · description 1/5", "", "no majority (tied: entity, human)"),
    ((1, 1, 3, 3, 2), 2, "entity 2/5 · human 2/5 · description 1/5", "", "no majority (tied: entity, human)"),
    # 2-1-1-1: one class has the most votes, but not more than half
    ((1, 1, 3, 2, 0), 3, "entity 2/5 · abbreviation 1/5 · description 1/5 · human 1/5", "", "no majority"),
    # 3-2: a real majority, followed or overridden
    ((2, 2, 2, 1, 1), 2, "description 3/5 · entity 2/5", "", None),
    ((2, 2, 2, 1, 1), 1, "description 3/5 · entity 2/5", OVERRIDE_FLAG, "overrides the LLMs' majority (description)"),
    # a single voter: its vote is the majority
    ((4,), 4, "location 1/1", "", None),
    ((4,), 5, "location 1/1", OVERRIDE_FLAG, "overrides the LLM's vote (location)"),
])
def test_the_votes_are_worded_as_they_are(labels, served, votes, flag, says):
    """Issue 26: a majority is more than half of the voters; a split or a tie is no majority, and the line
    says so instead of flagging an override."""
    p = np.full((1, len(TREC_CLASSES)), 0.1)
    p[0, served] = 0.5
    (f,) = review_fields(p, _votes(*labels), TREC_CLASSES)
    assert f["molal_votes"] == votes
    assert f["molal_flag"] == flag
    line = f["molal_review"]
    assert line.startswith(f"molal pre-filled {TREC_CLASSES[served]} (")
    if says is None:
        assert "majority" not in line.split("votes:")[1] and "overrides" not in line
    else:
        assert line.endswith(" · " + says), line
        assert ("overrides" in line) == bool(flag)


def test_review_panel_is_added_once_removed_exactly_and_adds_no_control():
    cfg = "<View>\n  " + TREC_CONFIG[len("<View>"):]
    with_panel = add_review_panel(cfg)
    assert has_review_panel(with_panel) and with_panel.count("$molal_review") == 1
    assert add_review_panel(with_panel) == with_panel  # idempotent
    assert remove_review_panel(with_panel) == cfg  # exactly what it was
    assert remove_review_panel(cfg) == cfg
    spec = parse_label_config(with_panel)
    assert spec == parse_label_config(cfg)  # the same Choices, Text and classes
    from label_studio_sdk.label_interface import LabelInterface

    controls = {c.name for c in LabelInterface(with_panel).controls}
    assert controls == {"label"}  # no control tag: nothing enters an annotation or an export
    with pytest.raises(ValueError, match="root <View>"):
        add_review_panel("<Text name='t' value='$text'/>")


def test_a_config_molal_cannot_serve_gets_no_panel():
    from molal.service.train import ensure_review_panel

    class FakeClient:  # the label config Label Studio would hand back; nothing is written
        def __init__(self, config):
            self.config, self.written = config, []

        def label_config(self, project):
            return self.config

        def set_label_config(self, project, config):
            self.written.append(config)

    multi = TREC_CONFIG.replace('choice="single"', 'choice="multiple"')
    c = FakeClient(multi)
    with pytest.raises(LabelConfigError, match="multiple"):
        ensure_review_panel(c, 1)
    assert c.written == []
    c = FakeClient(TREC_CONFIG)
    assert ensure_review_panel(c, 1) == "added" and has_review_panel(c.written[-1])
    c.config = c.written[-1]
    assert ensure_review_panel(c, 1) == "unchanged" and ensure_review_panel(c, 1, remove=True) == "removed"
    assert c.written[-1] == TREC_CONFIG
