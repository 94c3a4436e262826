"""A project's tasks as a job sees them: :class:`Pool` (pulled from Label Studio by the jobs of
:mod:`molal.service.train`, ranked and explained by :mod:`molal.service.queue`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Pool:
    """The project's tasks that have a text: ids, texts, data, human labels (row -> class index)."""

    task_ids: list[int]
    texts: list[str]
    data: list[dict]
    human: dict[int, int] = field(default_factory=dict)
    machine: dict[int, int] = field(default_factory=dict)  # rows labelled only by molal's certified annotations
    prediction_versions: list[list[str]] = field(default_factory=list)
    skipped: int = 0
    too_long: int = 0  # of ``skipped``: over the text length limit

    def __len__(self) -> int:
        return len(self.texts)

    def row_of(self) -> dict[int, int]:
        """Task id -> row."""
        return {t: r for r, t in enumerate(self.task_ids)}
