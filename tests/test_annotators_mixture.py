"""Replay + embedding annotators, the Mixture (config, default, cache, deadline, failures) and `molal annotate`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from molal import LLMOutputs
from molal.annotators import ConfigError, Mixture, Prompt
from molal.annotators.base import AnnotatorError, consistency_from_answers, match_answer
from molal.annotators.embedding import EmbeddingAnnotator
from molal.annotators.replay import ReplayAnnotator
from molal.cache import AnnotationCache
from molal.resources import asset_path

from .conftest import TREC_CLASSES, TREC_LLMS


@pytest.fixture(scope="module")
def bundled() -> LLMOutputs:
    return LLMOutputs.load(asset_path("trec_recorded.npz"))


@pytest.fixture(scope="module", autouse=True)
def _threads():
    import torch

    torch.set_num_threads(1)


# -- answer matching ---------------------------------------------------------------------------------------
def test_match_answer_rules() -> None:
    cls = ["human", "location", "numeric value"]
    assert match_answer("  Human. ", cls) == 0
    assert match_answer("**location**", cls) == 1
    assert match_answer("numeric value", cls) == 2
    assert match_answer("human - the question asks about a person", cls) == 0
    assert match_answer("humanoid", cls) is None  # word boundary
    assert match_answer("I think it is a location", cls) is None
    c = consistency_from_answers(["human", "Human", "location", "no idea"], cls)
    np.testing.assert_allclose(c, [0.5, 0.25, 0.0])


# -- replay ------------------------------------------------------------------------------------------------
def test_replay_serves_recorded_rows_in_any_class_order(bundled: LLMOutputs, trec_outputs: LLMOutputs) -> None:
    a = ReplayAnnotator("qwen")
    idx = [5, 0, 17, 300]
    texts = ["  " + bundled.texts[i].replace(" ", "   ") for i in idx]  # whitespace-normalised lookup
    perm = [3, 0, 5, 1, 2, 4]
    res = a.annotate(texts, [TREC_CLASSES[p] for p in perm])
    q = trec_outputs.llm_names.index("qwen")
    want = trec_outputs.normalized_probs()[idx, q][:, perm]
    np.testing.assert_allclose(res.probs, want, atol=1e-12)
    np.testing.assert_allclose(res.consistency, trec_outputs.consistency[idx, q][:, perm])
    np.testing.assert_allclose(res.probs.sum(1), 1.0)


def test_replay_missing_text_is_failed_not_uniform(bundled: LLMOutputs) -> None:
    res = ReplayAnnotator("yi").annotate([bundled.texts[0], "A text nobody recorded ?"], TREC_CLASSES)
    assert 1 in res.failed and "not in the recording" in res.failed[1]
    assert np.isnan(res.probs[1]).all() and np.isfinite(res.probs[0]).all()


def test_replay_unknown_class_and_bad_llm() -> None:
    a = ReplayAnnotator("gemma")
    with pytest.raises(ValueError, match="unknown: \\['sports'\\]"):
        a.annotate(["Who was Confucius ?"], ["human", "sports", "entity", "description", "location", "numeric"])
    with pytest.raises(ValueError, match="not in the recording"):
        ReplayAnnotator("gpt9")


def test_replay_jsonl_source(trec_recorded_paths) -> None:
    a = ReplayAnnotator("m", source=str(trec_recorded_paths[2]), classes=TREC_CLASSES)
    first = json.loads(trec_recorded_paths[2].read_text().splitlines()[0])
    res = a.annotate([first["text"]], TREC_CLASSES)
    want = np.array(first["llm_logits"]) / np.sum(first["llm_logits"])
    np.testing.assert_allclose(res.probs[0], want)


# -- bad input ---------------------------------------------------------------------------------------------
def test_bad_class_lists_and_texts() -> None:
    a = ReplayAnnotator("gemma")
    with pytest.raises(ValueError, match="class_names is empty"):
        a.annotate(["x"], [])
    with pytest.raises(ValueError, match="duplicate"):
        a.annotate(["x"], ["a", "a"])
    with pytest.raises(ValueError, match="descriptions name unknown classes"):
        Mixture([a]).annotate(["x"], TREC_CLASSES, descriptions={"sports": "games"})
    res = a.annotate(["", "   "], TREC_CLASSES)
    assert res.failed == {0: "empty text", 1: "empty text"}
    with pytest.raises(ValueError, match="examples\\[0\\] has label 'sports'"):
        Prompt(examples=[{"text": "t", "label": "sports"}]).check_classes(TREC_CLASSES)
    with pytest.raises(ValueError, match="placeholder"):
        Prompt(template="Text: {text} {oops}")


# -- embedding ---------------------------------------------------------------------------------------------
def test_embedding_zero_shot_on_real_minilm(shared_data: Path) -> None:
    rows = [json.loads(line) for line in (shared_data / "trec" / "test.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["label"] in ("human", "location", "numeric")][:90]
    classes = ["human", "location", "numeric"]
    desc = {"human": "a person's name", "location": "a place, city or country", "numeric": "a number, date or amount"}
    a = EmbeddingAnnotator("e", templates=["{description}"])
    res = a.annotate([r["text"] for r in rows], classes, descriptions=desc)
    assert not res.failed and res.tokens and res.tokens > 0
    np.testing.assert_allclose(res.probs.sum(1), 1.0)
    acc = (res.probs.argmax(1) == np.array([classes.index(r["label"]) for r in rows])).mean()
    assert acc > 0.55, acc  # chance is ~0.33
    # the identity reflects every knob that changes answers
    b = EmbeddingAnnotator("e", templates=["{label}"])
    assert a.identity() != b.identity()
    assert a.identity() != EmbeddingAnnotator("e", templates=["{description}"], temperature=0.1).identity()


def test_embedding_mc_dropout_consistency() -> None:
    a = EmbeddingAnnotator("e", samples=4, seed=1)
    res = a.annotate(["Who wrote Hamlet ?", "How far is the moon ?"], ["human", "numeric"])
    assert res.consistency.shape == (2, 2)
    np.testing.assert_allclose(res.consistency.sum(1), 1.0)
    assert set(np.unique(res.consistency * 4)) <= {0.0, 1.0, 2.0, 3.0, 4.0}
    again = a.annotate(["Who wrote Hamlet ?", "How far is the moon ?"], ["human", "numeric"])
    np.testing.assert_allclose(again.consistency, res.consistency)  # seeded


def test_embedding_bad_params() -> None:
    with pytest.raises(ValueError, match="temperature"):
        EmbeddingAnnotator("e", temperature=0)
    with pytest.raises(ValueError, match="templates\\[0\\]"):
        EmbeddingAnnotator("e", templates=["no placeholder"])


# -- mixture -----------------------------------------------------------------------------------------------
def test_default_mixture_replay_when_covered(bundled: LLMOutputs, trec_outputs: LLMOutputs, tmp_path: Path) -> None:
    mix = Mixture.default(bundled.texts[:50])
    assert mix.llm_names == TREC_LLMS
    cache = AnnotationCache(tmp_path / "c.sqlite")
    res = mix.annotate(bundled.texts[:50], TREC_CLASSES, cache=cache)
    assert res.done_idx.tolist() == list(range(50)) and not res.failed
    np.testing.assert_allclose(res.outputs.probs, trec_outputs.normalized_probs()[:50])
    np.testing.assert_allclose(res.outputs.consistency, trec_outputs.consistency[:50])
    assert res.stats["cache_misses"] == 250 and res.stats["cache_hits"] == 0
    res2 = mix.annotate(bundled.texts[:60], TREC_CLASSES, cache=cache)
    assert res2.stats["cache_hits"] == 250 and res2.stats["cache_misses"] == 50
    np.testing.assert_allclose(res2.outputs.probs[:50], res.outputs.probs)


def test_default_mixture_embedding_otherwise() -> None:
    mix = Mixture.default(["Is this a tweet about football?"], ["sports", "politics"])
    assert all(a.type == "embedding" for a in mix.annotators) and len(mix) >= 3
    assert Mixture.default(None).annotators[0].type == "embedding"


def test_mixture_failures_not_cached_and_duplicates(bundled: LLMOutputs, tmp_path: Path) -> None:
    cache = AnnotationCache(tmp_path / "c.sqlite")
    mix = Mixture([ReplayAnnotator("gemma"), ReplayAnnotator("yi")])
    texts = [bundled.texts[0], "unknown text ?", bundled.texts[0], "", bundled.texts[1]]
    res = mix.annotate(texts, TREC_CLASSES, cache=cache)
    assert res.done_idx.tolist() == [0, 2, 4]
    assert set(res.failed) == {1, 3}
    assert "gemma: text not in the recording" in res.failed[1] and "yi:" in res.failed[1]
    assert res.failed[3] == "empty text"
    assert cache.count() == 4  # 2 unique good texts x 2 annotators; nothing for the failures
    assert res.outputs.texts == [texts[0], texts[2], texts[4]]


def test_mixture_deadline_returns_only_ready_rows(bundled: LLMOutputs, tmp_path: Path) -> None:
    cache = AnnotationCache(tmp_path / "c.sqlite")
    mix = Mixture([ReplayAnnotator("gemma", batch_size=4), ReplayAnnotator("qwen", batch_size=4)])
    mix.annotate(bundled.texts[:10], TREC_CLASSES, cache=cache)
    res = mix.annotate(bundled.texts[:30], TREC_CLASSES, cache=cache, deadline=time.monotonic() - 1)
    assert res.done_idx.tolist() == list(range(10))  # only the cached rows
    assert not res.failed and res.stats["deadline_reached"] and res.pending_idx.tolist() == list(range(10, 30))
    assert len(res.outputs) == 10


def test_mixture_progress_callback(bundled: LLMOutputs) -> None:
    seen = []
    Mixture([ReplayAnnotator("gemma", batch_size=8)]).annotate(
        bundled.texts[:20], TREC_CLASSES, on_progress=lambda d, t: seen.append((d, t)), progress=True
    )
    assert seen[-1] == (20, 20) and len(seen) >= 3


# -- config --------------------------------------------------------------------------------------------------
def test_from_config_toml_and_yaml(tmp_path: Path) -> None:
    p = tmp_path / "m.toml"
    p.write_text(
        '[mixture]\ndescriptions = { human = "a person" }\n'
        '[[annotator]]\ntype = "replay"\nname = "gemma"\n'
        '[[annotator]]\ntype = "embedding"\nname = "emb"\ntemplates = ["{label}", "About {description}."]\ntemperature = 0.1\n'
    )
    mix = Mixture.from_config(p)
    assert mix.llm_names == ["gemma", "emb"] and mix.descriptions == {"human": "a person"}
    y = tmp_path / "m.yaml"
    y.write_text("annotators:\n  - {type: replay, name: yi}\n  - {type: embedding, name: e2}\n")
    assert Mixture.from_config(y).llm_names == ["yi", "e2"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('[[annotator]]\ntype = "nope"\nname = "x"\n', "field 'type' = 'nope'"),
        ('[[annotator]]\ntype = "embedding"\nname = "x"\ntempreature = 1\n', "unknown field 'tempreature'"),
        ('[[annotator]]\ntype = "embedding"\n', "missing field 'name'"),
        ('[[annotator]]\nname = "x"\n', "missing field 'type'"),
        ('[[annotator]]\ntype = "embedding"\nname = "x"\ntemperature = "hot"\n', "temperature must be a number"),
        ('[[annotator]]\ntype = "replay"\nname = "a"\nllm = "qwen"\n[[annotator]]\ntype = "replay"\nname = "a"\nllm = "yi"\n', "unique"),
        ("[[annotator]\n", "invalid TOML"),
        ("", "no annotators"),
        ('foo = 1\n[[annotator]]\ntype = "replay"\nname = "yi"\n', "unknown top-level field 'foo'"),
    ],
)
def test_config_errors_name_file_and_field(tmp_path: Path, body: str, needle: str) -> None:
    p = tmp_path / "mix.toml"
    p.write_text(body)
    with pytest.raises(ConfigError) as ei:
        Mixture.from_config(p)
    assert needle in str(ei.value) and "mix.toml" in str(ei.value)


def test_unavailable_annotator_error_type() -> None:
    assert issubclass(AnnotatorError, RuntimeError)


# -- CLI -----------------------------------------------------------------------------------------------------
def test_cli_annotate_default_mixture(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from molal.cli.main import app

    pool = tmp_path / "pool.jsonl"
    rows = [json.loads(line) for line in asset_path("trec.jsonl").read_text().splitlines()[:40]]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.npz"
    args = ["annotate", "--data", str(pool), "--out", str(out), "--cache", str(tmp_path / "c.sqlite"),
            "--labels", ",".join(TREC_CLASSES), "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    o = LLMOutputs.load(out)
    assert o.llm_names == TREC_LLMS and len(o) == 40 and o.class_names == TREC_CLASSES
    assert "pairwise agreement" in r.output and "acc" in r.output and "0 hits / 200 misses" in r.output
    r2 = CliRunner().invoke(app, args)
    assert r2.exit_code == 0 and "200 hits / 0 misses" in r2.output


def test_cli_annotate_bad_config_and_unknown_label(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from molal.cli.main import app

    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"text": "Who was Confucius ?", "label": "human"}\n{"text": "x", "label": "sports"}\n')
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[annotator]]\ntype = "embedding"\nname = "e"\nbogus = 1\n')
    r = CliRunner().invoke(app, ["annotate", "--data", str(pool), "--out", str(tmp_path / "o.npz"), "--config", str(cfg),
                                 "--labels", "human,entity"])
    assert r.exit_code == 2 and "sports" in r.output and "pool.jsonl" in r.output
    r = CliRunner().invoke(app, ["annotate", "--data", str(pool), "--out", str(tmp_path / "o.npz"), "--config", str(cfg)])
    assert r.exit_code == 2 and "bogus" in r.output and "bad.toml" in r.output
    assert not (tmp_path / "o.npz").exists()


def test_cli_annotate_with_config_failures_and_budget(tmp_path: Path, bundled: LLMOutputs) -> None:
    from typer.testing import CliRunner

    from molal.cli.main import app

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*bundled.texts[:3], "Not a recorded question ?"]))
    cfg = tmp_path / "mix.yaml"
    cfg.write_text("annotators:\n  - {type: replay, name: llama}\n  - {type: embedding, name: emb, templates: ['{label}']}\n")
    out = tmp_path / "o.npz"
    base = ["annotate", "--data", str(pool), "--out", str(out), "--config", str(cfg), "--labels", ",".join(TREC_CLASSES),
            "--cache", str(tmp_path / "c.sqlite"), "--no-progress"]
    r = CliRunner().invoke(app, base)
    assert r.exit_code == 1, r.output  # one row failed: reported, the rest saved
    assert "row 4" in r.output and "not in the recording" in r.output
    o = LLMOutputs.load(out)
    assert len(o) == 3 and o.llm_names == ["llama", "emb"]
    stats = json.loads((tmp_path / "o.npz.stats.json").read_text())
    assert stats["done_idx"] == [0, 1, 2] and "3" in stats["failed"]
    r = CliRunner().invoke(app, [*base[:-1], "--no-cache", "--time-budget", "0.000001", "--no-progress"])
    assert r.exit_code == 3 and "pending" in r.output


def test_replay_mixture_reproduces_all_recorded_trec_rows(trec_outputs: LLMOutputs) -> None:
    """The bundled asset + replay give back the shared recordings for all 5,452 TREC rows. Duplicate texts
    (71 rows) get the first occurrence's sampled answers, so consistency is compared on unique texts."""
    from collections import Counter

    texts = trec_outputs.texts
    res = Mixture.default(texts).annotate(texts, TREC_CLASSES)
    assert len(res.done_idx) == len(texts) and not res.failed
    np.testing.assert_allclose(res.outputs.probs, trec_outputs.normalized_probs(), atol=1e-6)
    counts = Counter(" ".join(t.split()) for t in texts)
    uniq = np.array([counts[" ".join(t.split())] == 1 for t in texts])
    assert uniq.sum() > 5300
    np.testing.assert_allclose(res.outputs.consistency[uniq], trec_outputs.consistency[uniq])


def test_cli_descriptions_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from molal.cli.main import app

    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"text": "Who wrote Hamlet ?", "label": "human"}\n{"text": "Where is Rome ?", "label": "location"}\n')
    cfg = tmp_path / "m.toml"
    cfg.write_text('[[annotator]]\ntype = "embedding"\nname = "d"\ntemplates = ["{description}"]\n')
    desc = tmp_path / "d.json"
    desc.write_text(json.dumps({"human": "a person", "location": "a place"}))
    out = tmp_path / "o.npz"
    args = ["annotate", "--data", str(pool), "--out", str(out), "--config", str(cfg), "--no-cache", "--no-progress"]
    r = CliRunner().invoke(app, [*args, "--descriptions", str(desc)])
    assert r.exit_code == 0, r.output
    with_desc = LLMOutputs.load(out).probs
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and not np.allclose(LLMOutputs.load(out).probs, with_desc)
    desc.write_text(json.dumps({"sports": "games"}))
    r = CliRunner().invoke(app, [*args, "--descriptions", str(desc)])
    assert r.exit_code == 2 and "d.json" in r.output and "sports" in r.output


def test_mixed_sampling_keeps_recorded_consistency(bundled: LLMOutputs, trec_outputs: LLMOutputs) -> None:
    texts = bundled.texts[:40]
    res = Mixture([ReplayAnnotator("yi"), EmbeddingAnnotator("e")]).annotate(texts, TREC_CLASSES)
    c = res.outputs.consistency
    np.testing.assert_allclose(c[:, 0], trec_outputs.consistency[:40, TREC_LLMS.index("yi")])
    onehot = np.eye(6)[res.outputs.probs[:, 1].argmax(1)]
    np.testing.assert_array_equal(c[:, 1], onehot)  # a non-sampling annotator: its argmax as a one-hot


# -- dataset prompt presets ------------------------------------------------------------------------------------
def test_prompt_presets_cover_their_datasets_and_explicit_options_win():
    from molal.annotators.presets import PRESETS
    from molal.annotators.prompts import DEFAULT_TEMPLATE, Prompt
    from molal.datasets import CLASS_NAMES

    for name, p in PRESETS.items():
        classes = CLASS_NAMES.get(name)
        if classes is not None and p["descriptions"]:  # a preset describes exactly its dataset's classes
            assert sorted(p["descriptions"]) == sorted(classes), name
        pr = Prompt.build(preset=name)
        body = pr.plain("Who wrote Hamlet ?", classes or ["a", "b"])
        assert "Who wrote Hamlet ?" in body and "{" not in body, name
    pr = Prompt.build(preset="trec")
    body = pr.messages("Who wrote Hamlet ?", TREC_CLASSES)[1]["content"]
    assert "- human: the answer is a person" in body and "kind of answer" in body
    # the caller's descriptions win per class; explicit options win over the preset
    body = pr.plain("x ?", TREC_CLASSES, {"human": "a person"})
    assert "- human: a person\n" in body and "- location: the answer is a place" in body
    assert Prompt.build(template="T: {text}", preset="trec").template == "T: {text}"
    # the cache identity of prompts without a preset is what it was (no descriptions key)
    assert "descriptions" not in Prompt.build().identity() and Prompt.build().template == DEFAULT_TEMPLATE
    assert Prompt.build(preset="trec").identity() != Prompt.build().identity()
    with pytest.raises(ValueError, match="unknown prompt preset 'trek'; known: ag_news, banking77"):
        Prompt.build(preset="trek")


def test_annotator_specs_take_a_preset(tmp_path):
    from molal.annotators.mixture import build_annotator

    a = build_annotator({"type": "openai", "name": "q", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                         "preset": "ag_news"})
    assert "newspaper" in a.prompt.template and a.prompt.descriptions["Sports"].startswith("sport")
    with pytest.raises(ConfigError, match="unknown prompt preset"):
        build_annotator({"type": "openai", "name": "q", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                         "preset": "nope"})
