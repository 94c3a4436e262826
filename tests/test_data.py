import json

import numpy as np
import pytest

from molal import DataError, LLMOutputs, load_dataset
from tests.conftest import TREC_CLASSES


def test_recorded_trec_shape_and_accuracies(trec_outputs, trec_gold):
    assert trec_outputs.shape == (5452, 5, 6)
    assert trec_outputs.llm_names == ["gemma", "llama", "mistral", "qwen", "yi"]
    assert trec_outputs.class_names == TREC_CLASSES
    assert trec_outputs.consistency is not None
    # the figures the shared README gives (argmax accuracy, probs / votes)
    acc_p = (trec_outputs.probs.argmax(2) == trec_gold[:, None]).mean(0)
    np.testing.assert_allclose(acc_p, [0.575, 0.486, 0.598, 0.660, 0.617], atol=0.0015)
    acc_v = (trec_outputs.consistency.argmax(2) == trec_gold[:, None]).mean(0)
    assert abs(acc_v[4] - 0.770) < 0.0015
    assert abs((trec_outputs.probs.mean(1).argmax(1) == trec_gold).mean() - 0.711) < 0.0015


def test_save_load_roundtrip(tmp_path, trec_outputs):
    sub = trec_outputs.subset(np.arange(100))
    path = sub.save(tmp_path / "o.npz")
    back = LLMOutputs.load(path)
    np.testing.assert_array_equal(back.probs, sub.probs)
    np.testing.assert_array_equal(back.consistency, sub.consistency)
    assert back.texts == sub.texts and back.class_names == sub.class_names and back.llm_names == sub.llm_names
    nocons = LLMOutputs(probs=sub.probs, consistency=None, class_names=sub.class_names, llm_names=sub.llm_names)
    back2 = LLMOutputs.load(nocons.save(tmp_path / "n.npz"))
    assert back2.consistency is None and back2.texts is None


def test_llmoutputs_validation():
    with pytest.raises(ValueError, match="shape"):
        LLMOutputs(probs=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="class names"):
        LLMOutputs(probs=np.zeros((3, 2, 2)), class_names=["a"], llm_names=["x", "y"])
    with pytest.raises(ValueError, match="finite"):
        LLMOutputs(probs=np.full((1, 1, 2), np.nan), class_names=["a", "b"], llm_names=["x"])


def test_dataset_errors_name_file_line_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "ok", "label": "a"}) + "\n" + "{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        load_dataset(p, class_names=["a", "b"])
    p.write_text(json.dumps({"text": "ok", "label": "zzz"}) + "\n")
    with pytest.raises(DataError, match=r"'label' = 'zzz' is not one of"):
        load_dataset(p, class_names=["a", "b"])
    p.write_text(json.dumps({"txt": "ok"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field 'text'"):
        load_dataset(p, class_names=["a"])
    p.write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(DataError, match="empty"):
        load_dataset(p, class_names=["a"])


def test_trec_dataset_loads(shared_data):
    ds = load_dataset(shared_data / "trec" / "test.jsonl", class_names=TREC_CLASSES)
    assert len(ds) == 500 and ds.labels is not None and (ds.labels >= 0).all()
