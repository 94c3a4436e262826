"""Few-shot examples drawn from the project's seed labels (issue 16): ``examples = "seeds"`` in a mixture
config; the training job fills them in from the human-labelled tasks (lowest task id first), /predict uses
the same ones, and the cache keys the answers by the examples actually in the prompt."""

from __future__ import annotations

from pathlib import Path

import pytest

from molal.annotators import Mixture
from molal.annotators.prompts import Prompt
from tests.llm_server import build_tiny_lm

CLASSES = ["human", "location", "numeric"]
LABELLED = [{"text": "Who is she ?", "label": "human"}, {"text": "Who is he ?", "label": "human"},
            {"text": "Where is it ?", "label": "location"}, {"text": "How many ?", "label": "numeric"}]


def test_prompt_seeds_are_filled_in_and_keyed_like_explicit_examples() -> None:
    p = Prompt.build(examples="seeds")
    assert p.examples_from == "seeds" and p.examples == []
    assert p.identity() == Prompt.build().identity()  # nothing filled in yet: the zero-shot prompt, same answers
    q = p.with_seed_examples(LABELLED)
    assert q.examples == [LABELLED[0], LABELLED[2], LABELLED[3]] and q.examples_from is None
    assert q.identity() == Prompt.build(examples=[LABELLED[0], LABELLED[2], LABELLED[3]]).identity()
    assert "Text: Who is she ?\nCategory: human" in q.plain("x", CLASSES)
    two = Prompt.build(examples="seeds", examples_per_class=2).with_seed_examples(LABELLED)
    assert [e["text"] for e in two.examples] == ["Who is she ?", "Who is he ?", "Where is it ?", "How many ?"]
    explicit = Prompt.build(examples=[LABELLED[3]])
    assert explicit.with_seed_examples(LABELLED) is explicit
    with pytest.raises(ValueError, match='list of examples or "seeds"'):
        Prompt.build(examples="all")
    with pytest.raises(ValueError, match="examples_per_class must be an integer from 1 to 8"):
        Prompt.build(examples="seeds", examples_per_class=0)


def test_mixture_fills_only_the_members_that_ask(tmp_path: Path) -> None:
    model = str(build_tiny_lm(tmp_path / "lm"))
    cfg = tmp_path / "mix.toml"
    cfg.write_text(f'[[annotator]]\ntype = "hf"\nname = "few"\nmodel = "{model}"\nexamples = "seeds"\n\n'
                   f'[[annotator]]\ntype = "hf"\nname = "zero"\nmodel = "{model}"\n')
    mix = Mixture.from_config(cfg)
    assert mix.wants_seed_examples()
    filled = mix.with_seed_examples(LABELLED)
    assert not filled.wants_seed_examples() and filled.annotators[1] is mix.annotators[1]
    assert filled.annotators[0] is not mix.annotators[0] and len(filled.annotators[0].prompt.examples) == 3
    assert filled.fingerprint() != mix.fingerprint()
    res = filled.annotate(["Where is Paris ?"], CLASSES)
    assert len(res.done_idx) == 1


def test_training_job_stores_the_seeds_and_predict_uses_them(tmp_path: Path) -> None:
    from molal.config import get_settings
    from molal.service.labelconfig import parse_label_config
    from molal.service.pipeline import Service
    from molal.service.train import Pool, fit_round

    config = ('<View><Text name="text" value="$text"/><Choices name="label" toName="text">'
              + "".join(f'<Choice value="{c}"/>' for c in CLASSES) + "</Choices></View>")
    spec = parse_label_config(config)
    model = str(build_tiny_lm(tmp_path / "lm"))
    cfg = tmp_path / "mix.toml"
    cfg.write_text(f'[[annotator]]\ntype = "hf"\nname = "few"\nmodel = "{model}"\nexamples = "seeds"\n\n'
                   f'[[annotator]]\ntype = "hf"\nname = "zero"\nmodel = "{model}"\npreset = "trec"\n')
    svc = Service(get_settings(model_dir=tmp_path / "state", device="cpu"))
    state = svc.store.project(3)
    state.set_setting("mixture", str(cfg))
    state.set_setting("student", False)
    state.set_setting("molam_candidates", "ds,best_single")
    texts = [f"Who wrote book {i} ?" for i in range(10)] + [f"Where is town {i} ?" for i in range(10)] + [
        f"How many cats {i} ?" for i in range(10)]
    human = {0: 0, 1: 0, 10: 1, 11: 1, 20: 2, 21: 2}
    pool = Pool(task_ids=[100 + i for i in range(30)][::-1], texts=texts, data=[{"text": t} for t in texts],
                human=human, prediction_versions=[[] for _ in texts])
    rr = fit_round(svc, state, spec, pool, None)
    ex = state.get("seed_examples")
    # lowest task id first (task ids run backwards here: row 21 has the lowest)
    assert [e["text"] for e in ex][:2] == ["How many cats 1 ?", "How many cats 0 ?"] and len(ex) == 6
    mix = svc.mixture_for(state, spec.classes)
    assert [e["text"] for e in mix.annotators[0].prompt.examples] == [
        "How many cats 1 ?", "Where is town 1 ?", "Who wrote book 1 ?"]
    hits0 = svc.cache.count()
    out = svc.predict({"project": 3, "tasks": [{"id": 100, "data": {"text": texts[29]}}], "label_config": config})
    assert out["results"][0] and out["model_version"] == rr.version  # the trained model serves: same mixture
    assert svc.cache.count() == hits0  # answered from the training job's cache entries
    # a training job that fails keeps the examples of the model that serves (they change with the model)
    from molal.service.train import TrainingError

    bad = Pool(task_ids=list(range(30)), texts=texts, data=[{"text": t} for t in texts], human={5: 0, 6: 0},
               prediction_versions=[[] for _ in texts])
    with pytest.raises(TrainingError, match="at least 2 classes"):
        fit_round(svc, state, spec, bad, None)
    assert state.get("seed_examples") == ex
    assert svc.mixture_for(state, spec.classes).annotators[0].prompt.examples[0]["text"] == "How many cats 1 ?"
