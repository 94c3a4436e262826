"""Broken datasets, recorded-output files and mixture configs fail with a clear error naming the file, the
line and the field (never a bare UnicodeDecodeError / KeyError / ValueError from deep inside)."""

from __future__ import annotations

import json

import pytest

from molal.data import DataError, LLMOutputs, load_dataset

CLASSES = ["a", "b"]


def write(path, content: bytes | str):
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


OK = json.dumps({"text": "fine", "label": "a"}) + "\n"


@pytest.mark.parametrize(("content", "where"), [
    (OK + "{not json\n", ":2: not valid JSON"),
    (OK + "\n\n" + "[1, 2]\n", ":4: expected a JSON object"),
    (OK.encode() + b"\xff\xfe broken bytes\n", ":2: not valid UTF-8"),
    (OK + json.dumps({"txt": "x"}) + "\n", ":2: missing field 'text'"),
    (OK + json.dumps({"text": 5}) + "\n", ":2: field 'text' must be a string"),
    (OK + json.dumps({"text": " \t "}) + "\n", ":2: field 'text' is empty"),
    (OK + "\n\n" + json.dumps({"text": "x", "label": "zz"}) + "\n", ":4: field 'label' = 'zz' is not one of"),
    ("", ": no rows"),
    ("\n\n", ": no rows"),
])
def test_dataset_errors_name_file_line_field(tmp_path, content, where):
    p = write(tmp_path / "data.jsonl", content)
    with pytest.raises(DataError) as ei:
        load_dataset(p, class_names=CLASSES)
    assert f"{p}{where}" in str(ei.value), str(ei.value)


def test_dataset_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_dataset(tmp_path / "nope.jsonl", class_names=CLASSES)
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match="dir.jsonl: not a file"):
        load_dataset(tmp_path / "dir.jsonl", class_names=CLASSES)


def rec(logits, labels=("a",), text="t"):
    return json.dumps({"text": text, "llm_logits": logits, "llm_label": list(labels)}) + "\n"


@pytest.mark.parametrize(("lines", "where"), [
    ([rec([0.5, 0.5]), rec([0.5])], ":2: field 'llm_logits' must be a list of 2 numbers"),
    ([rec([0.5, 0.5]), rec(["x", 1])], ":2: field 'llm_logits' must hold numbers"),
    ([rec([0.5, 0.5]), rec([0.5, 0.5]).replace("0.5, 0.5", "NaN, 1")], ":2: field 'llm_logits' must hold finite"),
    ([rec([0.5, 0.5]), rec([0.5, 0.5]).replace("0.5, 0.5", "Infinity, 0")], ":2: field 'llm_logits' must hold finite"),
    ([rec([0.5, 0.5]), rec([-0.5, 1.5])], ":2: field 'llm_logits' must hold finite non-negative"),
    ([rec([0.5, 0.5]), json.dumps({"text": "t", "llm_logits": [1, 0], "llm_label": "a"}) + "\n"],
     ":2: field 'llm_label' must be a list"),
    ([rec([0.5, 0.5]), "{oops\n"], ":2: not valid JSON"),
])
def test_recorded_jsonl_errors_name_file_line_field(tmp_path, lines, where):
    p = write(tmp_path / "llm.jsonl", "".join(lines))
    with pytest.raises(DataError) as ei:
        LLMOutputs.from_recorded_jsonl([p], CLASSES)
    assert f"{p}{where}" in str(ei.value), str(ei.value)


def test_recorded_jsonl_bad_bytes_and_misaligned_files(tmp_path):
    p = write(tmp_path / "a.jsonl", rec([1, 0]).encode() + b"\x80\n")
    with pytest.raises(DataError, match=r"a.jsonl:2: not valid UTF-8"):
        LLMOutputs.from_recorded_jsonl([p], CLASSES)
    a = write(tmp_path / "a.jsonl", rec([1, 0], text="x") + rec([1, 0], text="y"))
    b = write(tmp_path / "b.jsonl", rec([1, 0], text="x") + rec([1, 0], text="z"))
    with pytest.raises(DataError, match=r"b.jsonl: rows do not align with .*a.jsonl"):
        LLMOutputs.from_recorded_jsonl([a, b], CLASSES)
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        LLMOutputs.from_recorded_jsonl([a, tmp_path / "missing.jsonl"], CLASSES)


# -- mixture configs ------------------------------------------------------------------------------------------------
REPLAY = '[[annotator]]\ntype = "replay"\nname = "qwen"\nsource = "bundled:trec"\n'


@pytest.mark.parametrize(("name", "content", "words"), [
    ("m.toml", REPLAY + "bogus = 1\n", ["m.toml", "annotator #1", "'qwen'", "unknown field 'bogus'"]),
    ("m.toml", '[[annotator]]\ntype = "replay"\nname = \n', ["m.toml", "invalid TOML", "line 3"]),
    ("m.toml", '[[annotator]]\nname = "q"\n', ["m.toml", "annotator #1", "missing field 'type'"]),
    ("m.toml", '[[annotator]]\ntype = "gpt9"\nname = "q"\n', ["m.toml", "field 'type'", "gpt9"]),
    ("m.toml", '[[annotator]]\ntype = "replay"\n', ["m.toml", "missing field 'name'"]),
    ("m.toml", REPLAY + '[[annotator]]\ntype = "openai"\nname = "o"\nmodel = "m"\n',
     ["m.toml", "annotator #2", "'o'", "base_url"]),
    ("m.toml", '[[annotator]]\ntype = "replay"\nname = "q"\nsource = "nope.npz"\n', ["m.toml", "nope.npz"]),
    ("m.toml", REPLAY + "[mixture]\ncolour = 1\n", ["m.toml", "mixture.colour"]),
    ("m.toml", "title = 1\n", ["m.toml", "unknown top-level field 'title'"]),
    ("m.toml", "", ["m.toml", "no annotators"]),
    ("m.yaml", "annotators:\n  - type: replay\n    name: [unclosed\n", ["m.yaml", "invalid YAML", "line 3"]),
    ("m.yaml", "- 1\n- 2\n", ["m.yaml", "table at top level"]),
    ("m.yaml", "annotators:\n  - 5\n", ["m.yaml", "annotator #1", "expected a table"]),
])
def test_mixture_config_errors_name_file_line_field(tmp_path, name, content, words):
    from molal.annotators import Mixture
    from molal.annotators.mixture import ConfigError

    p = write(tmp_path / name, content)
    with pytest.raises(ConfigError) as ei:
        Mixture.from_config(p)
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))


def test_mixture_config_not_utf8_or_missing(tmp_path):
    from molal.annotators import Mixture
    from molal.annotators.mixture import ConfigError

    p = write(tmp_path / "m.toml", b'[[annotator]]\ntype = "replay"\nname = "\xff"\n')
    with pytest.raises(ConfigError, match=r"m.toml:3: not valid UTF-8"):
        Mixture.from_config(p)
    with pytest.raises(ConfigError, match="gone.toml: mixture config not found"):
        Mixture.from_config(tmp_path / "gone.toml")
    (tmp_path / "d.toml").mkdir()
    with pytest.raises(ConfigError, match="d.toml: cannot read"):
        Mixture.from_config(tmp_path / "d.toml")
