"""Issue 29: class descriptions and task framing (label config hints, labelling instructions, a mixture file's
``[descriptions]``), the member check on the seeds, and the annotator options reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from molal.annotators import ConfigError, Mixture
from molal.annotators.prompts import Prompt
from molal.service.labelconfig import LabelConfigError, parse_label_config, task_framing

REPO = Path(__file__).resolve().parent.parent


def _config(choices: str) -> str:
    return ('<View><Text name="text" value="$text"/><Choices name="label" toName="text" choice="single">'
            f"{choices}</Choices></View>")


def test_hints_and_aliases_describe_their_classes():
    spec = parse_label_config(_config(
        '<Choice value="Business" hint="companies,   markets\n and money"/>'
        '<Choice value="Science and technology" alias="Sci/Tech" hint="science, computers"/>'
        '<Choice value="Sports"/>'
        '<Choice value="World news" alias="World"/>'))
    assert spec.classes == ("Business", "Sci/Tech", "Sports", "World")
    assert spec.description_map == {"Business": "companies, markets and money",
                                    "Sci/Tech": "Science and technology: science, computers",
                                    "World": "World news"}


def test_a_hint_too_long_for_every_prompt_is_refused_with_the_reason():
    with pytest.raises(LabelConfigError, match="hint of <Choice> number 2 has 1001 characters"):
        parse_label_config(_config(f'<Choice value="a"/><Choice value="b" hint="{"x" * 1001}"/>'))


def test_task_framing_never_takes_molal_text_and_long_instructions_only_when_asked():
    from molal.service.review import INSTRUCTIONS
    from molal.service.status import STATUS_BEGIN, STATUS_END

    status = f"{STATUS_BEGIN}<div>molal: model v3 serves, 120 labels</div>{STATUS_END}"
    team = "<p>Label the <b>topic</b> of each news article.</p>"
    assert task_framing(status + team) == ("Label the topic of each news article.", "the labelling instructions")
    assert task_framing(team, "off")[0] == ""
    assert task_framing(status)[0] == ""
    assert task_framing(None)[1] == "the project has no labelling instructions"
    # the review panel's text beside the team's: not by default (which part is whose is a guess), with "on" yes
    framing, why = task_framing(INSTRUCTIONS + team)
    assert framing == "" and "instructions=on" in why
    assert task_framing(INSTRUCTIONS + team, "on")[0] == "Label the topic of each news article."
    long_ = "<p>" + "Read the whole article before you choose. " * 30 + "</p>"
    framing, why = task_framing(long_)
    assert framing == "" and "long" in why and "instructions=on" in why
    framing, why = task_framing(long_ * 3, "on")
    assert 1900 < len(framing) <= 2000 and "cut at" in why
    with pytest.raises(ValueError, match="instructions must be one of"):
        task_framing(team, "sometimes")


def test_a_mixture_files_descriptions_and_task_reach_every_member(tmp_path):
    p = tmp_path / "m.toml"
    p.write_text('task = "Label the topic of each news article."\n'
                 '[descriptions]\nBusiness = "companies and markets"\n'
                 '[[annotator]]\ntype = "openai"\nname = "o"\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\n'
                 '[[annotator]]\ntype = "embedding"\nname = "e"\ntemplates = ["{description}"]\n')
    mix = Mixture.from_config(p)
    o, e = mix.annotators
    classes = ["Business", "Sports"]
    msgs = "\n".join(m["content"] for m in o.prompt.messages("Stocks fell.", classes, mix.descriptions))
    assert msgs.startswith("Label the topic of each news article.") or "Label the topic" in msgs
    assert "Business: companies and markets" in msgs
    assert "companies and markets" in o.prompt.plain("Stocks fell.", classes, mix.descriptions)
    assert e.class_prompts(classes, mix.descriptions) == [["companies and markets"], ["Sports"]]
    # descriptions and the framing are part of what keys the answers: a changed hint re-asks the members
    bare = Mixture.from_config(_write(tmp_path / "bare.toml", p.read_text().split("[[annotator]]", 1)[1]))
    assert bare.fingerprint() != mix.fingerprint()
    other = mix.with_context({"Business": "firms, trade and money"})
    assert other.fingerprint() != mix.fingerprint()
    assert (mix.cache_identity(o, classes, mix.descriptions) != mix.cache_identity(o, classes, other.descriptions))
    assert o.identity() != bare.annotators[0].identity()  # the task framing is in the prompt's identity
    # Label Studio's hints win over the file's, per class
    assert mix.with_context({"Business": "trade"}).descriptions == {"Business": "trade"}
    p.write_text(p.read_text().replace('"companies and markets"', '"' + "x" * 1001 + '"'))
    with pytest.raises(ConfigError, match="descriptions.Business has over 1000 characters"):
        Mixture.from_config(p)


def _write(p: Path, body: str) -> Path:
    p.write_text("[[annotator]]" + body)
    return p


def test_a_template_without_task_gets_the_framing_first():
    prompt = Prompt(template="Text: {text}", answer_prefix="Category:").with_task("Sort these questions.")
    assert prompt.plain("Who?", ["a", "b"]) == "Sort these questions.\nText: Who?\nCategory:"
    assert Prompt(template="{task}Q: {text}").with_task("Frame.").plain("x", ["a"]).startswith("Frame.\nQ: x")
    assert Prompt().plain("x", ["a"]) == Prompt().with_task("").plain("x", ["a"])
    assert Prompt().with_task("Frame.").identity() != Prompt().identity()


# -- members measured on the seeds -------------------------------------------------------------------------
def _outputs(preds: dict[str, np.ndarray], k: int):
    from molal.data import LLMOutputs

    names = list(preds)
    n = len(next(iter(preds.values())))
    probs = np.full((n, len(names), k), 0.1 / max(1, k - 1))
    for j, name in enumerate(names):
        probs[np.arange(n), j, preds[name]] = 0.9
    return LLMOutputs(texts=[f"t{i}" for i in range(n)], llm_names=names, class_names=[f"c{c}" for c in range(k)],
                      probs=probs)


def test_collapsed_and_chance_members_are_flagged_with_what_to_try():
    from molal.aggregation.members import check_members

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 4, 400)
    good = np.where(rng.random(400) < 0.8, gold, rng.integers(0, 4, 400))
    collapsed = np.where(rng.random(400) < 0.9, 2, gold)
    noise = rng.integers(0, 4, 400)
    out = _outputs({"good": good, "collapsed": collapsed, "noise": noise}, 4)
    seeds = np.arange(50)
    checks = {c.name: c for c in check_members(out, seeds, gold[seeds], kinds={"noise": "scorer"})}
    assert checks["good"].problem is None and checks["good"].seed_accuracy > 0.6
    assert checks["collapsed"].problem == "collapsed onto 'c2'" and checks["collapsed"].top_share > 0.85
    assert checks["noise"].problem == "at or below chance" or checks["noise"].seed_accuracy < 0.4
    line = checks["collapsed"].line()
    assert "collapsed onto 'c2'" in line and "describe the classes" in line and 'calibrate = "content_free"' in line
    assert "calibrate" not in (checks["noise"].advice or "")  # a scorer has no prompt to calibrate
    # a member that is calibrated already is not told to calibrate: its calibration may be the cause
    cal = {c.name: c for c in check_members(out, seeds, gold[seeds], calibrated=["collapsed"])}["collapsed"]
    assert cal.problem == checks["collapsed"].problem and cal.calibrated
    assert "may be the cause" in cal.line() and "without calibrate" in cal.line() and "add calibrate" not in cal.line()
    # without seeds a collapse is still seen, against the other members' majority
    assert {c.name for c in check_members(out, [], []) if c.problem} == {"collapsed"}


def test_molam_drops_a_collapsed_member_only_when_the_seeds_say_so(trec_outputs, trec_gold, tmp_path):
    """A member that always answers one class is added to the five recorded TREC LLMs: MoLAM, choosing on 60
    seeds only, drops it, and its accuracy on the other texts is that of MoLAM without it."""
    from molal.aggregation.molam import MoLAM
    from molal.data import LLMOutputs

    o, gold = trec_outputs, np.asarray(trec_gold)
    n, k = len(o), o.n_classes
    probs = np.full((n, 1, k), 0.01)
    probs[:, 0, 3] = 0.95
    bad = LLMOutputs(texts=o.texts, llm_names=["stuck"], class_names=o.class_names, probs=probs)
    both = LLMOutputs.concat_llms([o, bad])
    idx = np.random.default_rng(0).choice(n, 60, replace=False)
    rest = np.setdiff1d(np.arange(n), idx)
    opts = {"candidates": ["lr_1", "best_single"]}
    m = MoLAM(**opts).fit(both, idx, gold[idx])
    assert m.metadata["members"]["flagged"] == {"stuck": f"collapsed onto {o.class_names[3]!r}"}
    assert m.metadata["members"]["dropped"] == ["stuck"], m.metadata["members"]
    ref = MoLAM(**opts).fit(o, idx, gold[idx])
    assert np.array_equal(m.predict(both)[rest], ref.predict(o)[rest])
    # the choice is stored with the model
    m2 = MoLAM.load(m.save(tmp_path / "molam"))
    assert m2.members_ == [n for n in both.llm_names if n != "stuck"]
    assert np.array_equal(m2.predict(both), m.predict(both))


# -- the annotator options reference ----------------------------------------------------------------------
def test_every_annotator_option_has_a_line_and_the_reference_is_current(monkeypatch):
    from molal.annotators import reference

    assert reference.undocumented() == []
    assert (REPO / "docs" / "annotators.md").read_text() == reference.markdown(), (
        "docs/annotators.md is stale: molal annotators --output docs/annotators.md")
    # an option without a line fails (here: one taken away)
    docs = dict(reference.OPTION_DOCS)
    docs.pop("prefill")
    monkeypatch.setattr(reference, "OPTION_DOCS", docs)
    assert set(reference.undocumented()) == {"hf.prefill", "vllm.prefill", "openai.prefill"} & {
        f"{t}.prefill" for t, o in reference.options().items() if "prefill" in o}
    assert reference.undocumented()


def test_the_reference_lists_every_preset_and_the_25_options_the_issue_found():
    from molal.annotators import reference
    from molal.annotators.presets import PRESETS

    md = reference.markdown()
    for p in PRESETS:
        assert f"### `{p}`" in md
    for o in ("template", "system", "answer_prefix", "verbalizers", "temperature", "top_p", "max_new_tokens", "seed",
              "batch_size", "max_length", "device", "dtype", "reuse_prompt_cache", "api_key", "max_tokens", "timeout",
              "backoff", "prompts_per_request", "extra_body", "templates", "text_template", "max_model_len",
              "gpu_memory_utilization", "tensor_parallel_size", "enable_prefix_caching"):
        assert f"| `{o}` |" in md, o
