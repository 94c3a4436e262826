"""The bundled benchmark datasets of ``shared/data`` by name (class order fixed here, once)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from molal.data import DataError, LLMOutputs, TextDataset, load_dataset
from molal.resources import shared_data_dir

#: Class order per dataset. TREC's is the order of the recorded LLM outputs.
CLASS_NAMES: dict[str, list[str]] = {
    "trec": ["abbreviation", "entity", "description", "human", "location", "numeric"],
    "ag_news": ["World", "Sports", "Business", "Sci/Tech"],
    "sst2": ["negative", "positive"],
    "imdb": ["negative", "positive"],
    "pubmed-20k-rct": ["background", "conclusion", "method", "objective", "result"],
}

RECORDED_LLMS: dict[str, list[str]] = {"trec": ["gemma", "llama", "mistral", "qwen", "yi"]}


@dataclass
class NamedDataset:
    name: str
    root: Path

    @property
    def class_names(self) -> list[str]:
        if self.name in CLASS_NAMES:
            return CLASS_NAMES[self.name]
        return load_dataset(self.root / "train.jsonl").class_names

    def split(self, split: str) -> TextDataset:
        path = self.root / f"{split}.jsonl"
        if not path.exists():
            raise DataError(f"dataset {self.name!r} has no split {split!r} ({path})")
        return load_dataset(path, class_names=self.class_names)

    def recorded_paths(self) -> list[Path]:
        if self.name not in RECORDED_LLMS:
            raise DataError(f"no recorded LLM outputs for dataset {self.name!r}")
        base = self.root.parent / "llm-outputs" / self.name
        return [base / f"{m}.jsonl" for m in RECORDED_LLMS[self.name]]

    def recorded_outputs(self) -> LLMOutputs:
        """Recorded outputs of the real LLMs (with texts). The recorded rows are the train questions in the
        recording's own order, NOT the order of ``split('train')``: take gold labels from
        :meth:`recorded_labels`, which reads the same files."""
        return LLMOutputs.from_recorded_jsonl(self.recorded_paths(), self.class_names)

    def recorded_labels(self) -> TextDataset:
        """The gold labels of the recorded rows (same rows, same order as :meth:`recorded_outputs`)."""
        return load_dataset(self.recorded_paths()[0], class_names=self.class_names)


def get_dataset(name: str) -> NamedDataset:
    """A dataset folder of shared/data by name (``trec``, ``ag_news``, ...)."""
    base = shared_data_dir()
    if base is None:
        raise DataError("shared data folder not found; set MOLAL_SHARED_DATA to the folder holding trec/, ag_news/, ...")
    root = base / name
    if not root.is_dir():
        have = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name != "llm-outputs")
        raise DataError(f"unknown dataset {name!r}; available: {have}")
    return NamedDataset(name=name, root=root)
