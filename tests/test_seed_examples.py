"""Few-shot examples drawn from the project's seed labels (issue 16): ``examples = "seeds"`` in a mixture
config; the training job fills them in from the human-labelled tasks (lowest task id first), /predict uses
the same ones, and the cache keys the answers by the examples actually in the prompt."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
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


class _BiasedLM:
    """A language model's answers as a small base model gives them under a few-shot prompt (what Gemma-3-270M did
    with one AG News example per class, measured): on content-free inputs ("N/A", "[MASK]", "-") it puts 1% on
    the last class and 64% on the third; on real texts it favours the third class strongly too, but the true
    class still gains the most from the text. Only the model is stood in for: the calibration under test is
    molal's own (Annotator.annotate)."""

    CONTENT_FREE = np.array([0.24, 0.10, 0.65, 0.01])
    REAL = np.array([0.15, 0.10, 0.70, 0.05])


def _biased_annotator(calibrate: str | None):
    from molal.annotators.base import CONTENT_FREE_TEXTS, Annotator, AnnotatorResult

    class Biased(Annotator):
        type = "biased"

        def __init__(self) -> None:
            self.name = "biased"
            self.prompt = Prompt.build(examples="seeds")
            self.calibrate = calibrate

        def _identity(self):
            return {"prompt": self.prompt.identity()}

        def _annotate(self, texts, class_names, descriptions):
            rows = []
            for t in texts:
                if t in CONTENT_FREE_TEXTS:
                    rows.append(_BiasedLM.CONTENT_FREE)
                else:
                    p = _BiasedLM.REAL.copy()
                    p[int(t.split("#")[1]) % 4] *= 2.2  # the text's class: what the model does read
                    rows.append(p / p.sum())
            return AnnotatorResult(probs=np.array(rows))

    return Biased()


def test_a_few_shot_prompt_is_calibrated_on_the_projects_texts_not_on_content_free_inputs() -> None:
    """Gemma-3 with ``examples = "seeds"`` and ``calibrate = "content_free"`` labelled every AG News text
    'Sci/Tech': with examples in the prompt, its answers on content-free inputs put 1% on that class, and
    dividing by 1% sent everything there. Calibrated on the labelled texts the prompt does not show (their
    mean answer, no label read), the bias is the one the model has on real texts."""
    from molal.annotators.prompts import CALIBRATION_TEXTS, MIN_CALIBRATION_TEXTS

    classes = ["World", "Sports", "Business", "Sci/Tech"]
    labelled = [{"text": f"seed #{i}", "label": classes[i % 4]} for i in range(40)]
    texts = [f"pool #{i}" for i in range(200)]
    gold = np.arange(200) % 4

    def run(ann):
        res = ann.annotate(texts, classes)
        pred = res.probs.argmax(1)
        return float((pred == gold).mean()), float(np.bincount(pred, minlength=4).max() / len(pred))

    filled = Prompt.build(examples="seeds").with_seed_examples(labelled)
    assert [e["text"] for e in filled.examples] == ["seed #0", "seed #1", "seed #2", "seed #3"]
    assert filled.calibration_texts == [f"seed #{i}" for i in range(4, 4 + CALIBRATION_TEXTS)]
    assert Prompt.build(examples="seeds").with_seed_examples(labelled[:4 + MIN_CALIBRATION_TEXTS - 1]
                                                             ).calibration_texts == []  # too few: content-free
    # what the old calibration gave: every text the class the content-free inputs gave 1%
    old = _biased_annotator("content_free")
    old.prompt = dataclasses.replace(filled, calibration_texts=[])
    acc_old, top_old = run(old)
    assert top_old == 1.0 and acc_old == 0.25
    new = _biased_annotator("content_free")
    new.prompt = filled
    acc_new, top_new = run(new)
    assert acc_new == 1.0 and top_new == 0.25
    raw = _biased_annotator(None)
    raw.prompt = filled
    assert run(raw)[1] >= 0.75  # uncalibrated: the model's own collapse onto its favourite class
    # the cache keys a calibrated member by its calibration texts; an uncalibrated one keeps the explicit prompt's
    assert new.identity()["calibrated_on"] and "calibrated_on" not in old.identity()
    assert "calibrated_on" not in raw.identity()
    other = _biased_annotator("content_free")
    other.prompt = dataclasses.replace(filled, calibration_texts=filled.calibration_texts[1:])
    assert other.identity() != new.identity()
