"""The label config is XML, edited and read as XML (issue 25 E): the review panel goes in and out with an XML
parser, the edit is parsed again before Label Studio gets it (and before a training job publishes anything),
and class names are one class per name a person reads (no "a" and "a ", no bidi or control characters).

1. the panel goes where a parser says the root's content begins, and nothing else in the text changes
2. an edit that cannot be made fails a training job before anything is published
3. class names: the same class once trimmed and NFC-normalised is a duplicate; control and bidi characters
   are refused with the position of the class, never echoed
"""

from __future__ import annotations

import re

import pytest

from molal.config import get_settings
from molal.service.labelconfig import LabelConfigError, parse_label_config
from molal.service.review import (
    PANEL,
    ReviewPanelError,
    add_review_panel,
    check_edit,
    has_review_panel,
    remove_review_panel,
)
from tests.conftest import TREC_CLASSES, TREC_CONFIG
from tests.harness import JSONServer

BODY = ('<Text name="text" value="$text"/><Choices name="label" toName="text" choice="single">'
        + "".join(f'<Choice value="{c}"/>' for c in TREC_CLASSES) + "</Choices>")

#: (everything up to the end of the root's start tag, the rest): the panel must go exactly between them
FAITHFUL = [
    ('<View style="a>b">', BODY + "</View>"),  # a '>' inside an attribute value
    ("<!-- <View> -->\n<View>", BODY + "</View>"),  # a commented-out root before the real one
    ("<?xml version='1.0'?>\n<!-- made by hand -->\n<View\n  title='x &gt; y'  style=\"a\"\n>",
     "\n  <!-- the text -->\n  " + BODY + "\n</View>\n"),  # prolog, odd spacing, single quotes
    ("<View>", '<Header value="d&#233;j&#224; &amp; vu"/>' + BODY
     + "<View><!-- molal:review-panel --></View></View>"),  # references; a marker deeper is not the panel
    ('<View title="&lt;!-- molal:review-panel --&gt;">', BODY + "</View>"),  # a marker in an attribute is not it
]


@pytest.mark.parametrize("head, rest", FAITHFUL)
def test_the_panel_goes_where_the_parser_says_and_nothing_else_changes(head, rest):
    from label_studio_sdk.label_interface import LabelInterface

    config = head + rest
    assert not has_review_panel(config)
    edited = add_review_panel(config)
    assert edited == head + PANEL + rest  # comments, attribute order and quoting, whitespace, references: as written
    assert has_review_panel(edited) and add_review_panel(edited) == edited
    assert remove_review_panel(edited) == config
    assert parse_label_config(edited) == parse_label_config(config)  # the same Choices, Text and classes
    LabelInterface(edited).validate()  # Label Studio's own parser and schema accept it
    assert {c.name for c in LabelInterface(edited).controls} == {"label"}
    check_edit(config, edited)


@pytest.mark.parametrize("config, words", [
    ('<View><Text name="t" value="$t"/>', "not well-formed"),
    ('<View/>', "root <View/> is empty"),
    (TREC_CONFIG.replace("<View>", "<Form>").replace("</View>", "</Form>"), "not the root <View>"),
    ('<?xml version="1.0"?><!DOCTYPE View [<!ENTITY x SYSTEM "file:///etc/passwd">]>' + TREC_CONFIG, "entities"),
    ('<!DOCTYPE View [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>' + TREC_CONFIG, "entities"),
    (f"<View>{PANEL[:-len('<!-- /molal:review-panel -->')]}{BODY}</View>", "begins but does not end"),
])
def test_a_config_the_panel_cannot_go_into_is_refused_with_the_reason(config, words):
    with pytest.raises(ReviewPanelError, match=re.escape(words)):
        add_review_panel(config)


def test_an_edit_that_changes_what_molal_serves_is_refused():
    other = TREC_CONFIG.replace('value="entity"', 'value="thing"')
    with pytest.raises(ReviewPanelError, match="other classes"):
        check_edit(TREC_CONFIG, add_review_panel(other))
    with pytest.raises(ReviewPanelError, match="not well-formed"):
        check_edit(TREC_CONFIG, add_review_panel(TREC_CONFIG)[:-3])


# -- 2: the edit comes before anything is published ---------------------------------------------------------------
class FakeLS(JSONServer):
    """The calls of a training job up to the review panel: the project (its label config) and its tasks, half of
    them labelled; records every request."""

    def __init__(self, config: str, rows: list[dict]) -> None:
        self.config = config
        self.hits: list[tuple[str, str]] = []
        self.tasks = []
        for i, r in enumerate(rows):
            ann = [{"id": i + 1, "was_cancelled": False, "updated_at": "2026-01-01T00:00:00",
                    "result": [{"from_name": "label", "to_name": "text", "type": "choices",
                                "value": {"choices": [r["label"]]}}]}] if i % 2 == 0 else []
            self.tasks.append({"id": i + 1, "data": {"text": r["text"]}, "annotations": ann, "predictions": [],
                               "total_annotations": len(ann)})
        super().__init__()

    def respond(self, method, u, raw):
        self.hits.append((method, u.path))
        if method == "GET" and re.fullmatch(r"/api/projects/7/?", u.path):
            return 200, {"id": 7, "title": "p", "label_config": self.config}
        if method == "GET" and re.fullmatch(r"/api/tasks/?", u.path):
            page = int((re.search(r"page=(\d+)", u.query) or [0, "1"])[1])
            return 200, {"tasks": self.tasks if page == 1 else [], "total": len(self.tasks)}
        return 404, {"detail": f"not in the fake: {method} {u.path}"}


def test_a_panel_that_cannot_go_in_fails_the_training_job_before_anything_is_published(tmp_path):
    """Before: the panel was the job's last step, after the new model was published and its predictions sent;
    a config it could not edit failed the job with the new model already serving. Now nothing is published."""
    import json

    from molal.resources import asset_path
    from molal.service.jobs import execute
    from molal.service.pipeline import Service

    with open(asset_path("trec.jsonl")) as fh:
        rows = [json.loads(line) for _, line in zip(range(60), fh, strict=False)]
    config = TREC_CONFIG.replace("<View>", "<Form>").replace("</View>", "</Form>")  # served, but no root <View>
    fake = FakeLS(config, rows)
    try:
        mix = tmp_path / "mixture.toml"
        mix.write_text("".join(f'[[annotator]]\ntype = "replay"\nname = "{m}"\nsource = "bundled:trec"\n\n'
                               for m in ("qwen", "yi")))
        svc = Service(get_settings(model_dir=tmp_path / "state", label_studio_url=fake.url,
                                   label_studio_api_key="k" * 20, mixture=mix, device="cpu"))
        state = svc.store.project(7)
        state.put("label_config", config)
        for k, v in {"review_panel": True, "student": False, "per_llm_predictions": False,
                     "molam_candidates": "ds,best_single"}.items():
            state.set_setting(k, v)
        svc.submit(7, "train", source="test")
        row = execute(svc.jobs, svc.jobs.claim(), svc.run_job)
        assert row["status"] == "failed" and "ReviewPanelError" in row["message"], row["message"]
        assert "not the root <View>" in row["message"]
        assert state.current() is None and state.versions() == []  # no model published
        assert [h for h in fake.hits if h[0] != "GET"] == []  # nothing sent to Label Studio
    finally:
        fake.close()


# -- 3: class names ---------------------------------------------------------------------------------------------------
def config_with(*classes: str) -> str:
    return ('<View><Text name="t" value="$text"/><Choices name="c" toName="t" choice="single">'
            + "".join(f'<Choice value="{v}"/>' for v in classes) + "</Choices></View>")


@pytest.mark.parametrize("classes, words", [
    (["a", "a "], "duplicate <Choice> values: 'a' (the same class once surrounding spaces are trimmed"),
    (["b", " a", "a\t"], "choices number 2 and 3"),
    (["\u00e9t\u00e9", "e\u0301te\u0301"], "Unicode is normalised"),  # NFC: the same word
    (["x", "\u212b", "\u00c5"], "duplicate"),  # ANGSTROM SIGN and A WITH RING ABOVE: one letter in NFC
])
def test_class_names_that_are_one_class_are_refused(tmp_path, classes, words):
    with pytest.raises(LabelConfigError, match=re.escape(words)):
        parse_label_config(config_with(*classes))


@pytest.mark.parametrize("name, code", [
    ("admin\u202efdp.exe", "U+202E RIGHT-TO-LEFT OVERRIDE"),
    ("\u2066isolated\u2069", "U+2066 LEFT-TO-RIGHT ISOLATE"),
    ("mark\u200e", "U+200E LEFT-TO-RIGHT MARK"),
    ("\u061cArabic", "U+061C ARABIC LETTER MARK"),
    ("zero\u200bwidth", "U+200B ZERO WIDTH SPACE"),
    ("soft\u00adhyphen", "U+00AD SOFT HYPHEN"),
    ("line\u2028break", "U+2028 LINE SEPARATOR"),
    ("c1\u0085control", "U+0085 control character"),
    ("bom\ufeffinside", "U+FEFF ZERO WIDTH NO-BREAK SPACE"),
])
def test_control_and_bidi_characters_in_class_names_are_refused_by_position(tmp_path, name, code):
    from backend.app import create_app

    app = create_app(get_settings(model_dir=tmp_path / "state"), start_worker=False)
    r = app.test_client().post("/setup", json={"project": 9, "schema": config_with("plain", name)})
    assert r.status_code == 422, r.json
    err = r.json["error"]
    assert code in err and "<Choice> number 2" in err, err
    assert not any(ch in err for ch in name if not ch.isascii()), err  # the raw character is never echoed
    assert app.config["MOLAL_SERVICE"].store.project_ids() == []  # nothing stored


def test_scripts_that_need_joiners_and_emoji_sequences_are_accepted():
    spec = parse_label_config(config_with("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
                                          "\U0001f468\u200d\U0001f469\u200d\U0001f467", "caf\u00e9"))
    assert spec.classes[0] == "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # names are kept as written
