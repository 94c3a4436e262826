"""Batch annotation of a large pool on Ray Data (optional: ``pip install 'molal[ray]'``).

:meth:`RayEngine.annotate` gives the same :class:`~molal.annotators.mixture.MixtureResult` as
:meth:`Mixture.annotate <molal.annotators.mixture.Mixture.annotate>`, and goes through the same code and the
same annotation cache:

1. the driver reads the cache: (annotator, text) pairs answered before are not sent anywhere;
2. the texts with a missing pair become a Ray Dataset, cut in shards of ``shard_size`` texts;
   ``map_batches`` runs a pool of ``workers`` actors (each holds one copy of the mixture, so a model is loaded
   once per actor, with ``cpus_per_worker`` / ``gpus_per_worker`` reserved for it), and each actor runs
   ``Mixture.annotate`` on its shard with the cache: every finished batch is committed there;
3. the driver streams the shards' reports (progress) and then builds the result from the cache alone.

A run killed at any point keeps what it committed; the next run sends only the rest (step 1). Nothing is
annotated twice: a shard's own ``Mixture.annotate`` reads the cache before calling a model too.

``address=None`` starts a local Ray cluster in this process (the CPUs of this machine); ``"auto"`` or
``"ray://head:10001"`` joins a running cluster, unchanged. On a cluster with more than one node, the cache
must be a database every node reaches (``postgresql://``, ``MOLAL_DATABASE_URL``): a SQLite file is refused.
Ray's usage statistics are switched off (they would be sent to Anyscale).

The embedded default does not use this module: without ``engine = "ray"`` molal never imports Ray.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from molal.annotators.base import AnnotatorError
from molal.annotators.mixture import Mixture, MixtureResult
from molal.db import check_target, describe, first_line, is_url


class EngineError(AnnotatorError):
    """The distributed engine cannot run (Ray missing, no reachable cluster, a cache the workers cannot share)."""


class _Shard:
    """A Ray actor's work: one mixture (models loaded on first use, kept for every later shard), one cache."""

    def __init__(self, mixture: Mixture, class_names: list[str], descriptions: dict[str, str] | None,
                 cache_target: str) -> None:
        from molal.cache import AnnotationCache
        from molal.config import get_settings
        from molal.embeddings import current_store, use_store

        self.mixture, self.class_names, self.descriptions = mixture, class_names, descriptions
        self.cache = AnnotationCache(cache_target)
        if current_store() is None:  # the actor's texts' embeddings beside the cache, as the driver's
            use_store(cache_target, get_settings().embedding_store_mb)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        t0 = time.perf_counter()
        res = self.mixture.annotate(texts, self.class_names, cache=self.cache, descriptions=self.descriptions)
        st = res.stats
        failed = {texts[i]: why for i, why in res.failed.items()}
        return {
            "texts": np.array([len(texts)]),
            "pairs": np.array([len(texts) * len(self.mixture)]),
            "cache_hits": np.array([int(st["cache_hits"])]),
            "annotated": np.array([int(st["annotated"])]),
            "per_annotator": np.array([json.dumps(st["per_annotator"])]),
            "failed": np.array([json.dumps(failed)]),
            "seconds": np.array([time.perf_counter() - t0]),
            "pid": np.array([os.getpid()]),
        }


@dataclass
class RayEngine:
    """Annotate a pool with a mixture on Ray Data (see the module docstring).

    Args:
        address: None starts a local cluster here; ``"auto"`` / ``"ray://host:10001"`` joins a running one.
        workers: annotation actors (each loads the mixture's models once).
        shard_size: texts per shard (a Ray Data batch; its cache writes happen per annotator batch).
        cpus_per_worker / gpus_per_worker: resources each actor reserves (``gpus_per_worker=1`` for an
            in-process GPU model; 0 for annotators that call LLM servers over HTTP).
        object_store_mb: the local cluster's object store (texts and small reports only travel through it).
    """

    address: str | None = None
    workers: int = 2
    shard_size: int = 256
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    object_store_mb: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or not 1 <= self.workers <= 4096:
            raise ValueError(f"workers must be an integer in [1, 4096], got {self.workers!r}")
        if not isinstance(self.shard_size, int) or not 1 <= self.shard_size <= 1_000_000:
            raise ValueError(f"shard_size must be an integer in [1, 1000000], got {self.shard_size!r}")
        if not self.cpus_per_worker > 0 or self.gpus_per_worker < 0:
            raise ValueError("cpus_per_worker must be > 0 and gpus_per_worker >= 0")

    # -- the cluster -----------------------------------------------------------------------------------------
    def _ray(self) -> Any:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage statistics sent out
        for name in ("ray", "ray.data"):  # its INFO lines would interleave with molal's progress
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            import ray
            import ray.data  # noqa: F401
        except ImportError as exc:
            raise EngineError("engine 'ray' needs Ray Data: pip install 'molal[ray]'") from exc
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if self.address is None:
                kw.update(num_cpus=max(1, int(np.ceil(self.workers * self.cpus_per_worker))) + 1,
                          object_store_memory=self.object_store_mb * 2**20)
            else:
                kw["address"] = self.address
            try:
                ray.init(**kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = "a local cluster" if self.address is None else f"the cluster at {describe(self.address)}"
                raise EngineError(f"cannot start or reach {where}: {first_line(exc)[:300]}") from None
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # molal reports progress itself (one bar, job progress)
        return ray

    def _check_cache(self, ray: Any, cache_target: str) -> None:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if not is_url(cache_target) and len({n.get("NodeManagerAddress") for n in nodes}) > 1:
            raise EngineError(
                f"the cluster has {len(nodes)} nodes but the annotation cache is a SQLite file ({cache_target}): "
                "its workers need a database they all reach (postgresql://..., MOLAL_DATABASE_URL)")

    # -- annotation -------------------------------------------------------------------------------------------
    def annotate(
        self,
        mixture: Mixture,
        texts: Sequence[str],
        class_names: Sequence[str],
        *,
        cache: str | os.PathLike[str],
        descriptions: Mapping[str, str] | None = None,
        progress: bool = False,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> MixtureResult:
        """Annotate ``texts`` like :meth:`Mixture.annotate`, on the cluster; ``cache`` is the cache's path or URL
        (every worker opens it). ``stats`` add ``engine``, ``workers``, ``shards`` and ``worker_pids``."""
        from molal.cache import AnnotationCache
        from molal.progress import progress_bar

        check_target(cache if isinstance(cache, str) else str(cache), "the annotation cache")
        cache_target = str(cache) if is_url(str(cache)) else str(Path(cache).resolve())
        t0 = time.perf_counter()
        store = AnnotationCache(cache_target)
        try:
            # 1. what the cache holds: no model call (the deadline has passed before it starts)
            before = mixture.annotate(texts, class_names, cache=store, descriptions=descriptions,
                                      deadline=time.monotonic() - 1.0)
            pending = before.pending_idx
            todo = list(dict.fromkeys(str(texts[i]) for i in pending))
            n_pairs = int(before.stats["n_unique"]) * len(mixture)
            hits = int(before.stats["cache_hits"])
            reports: list[dict[str, Any]] = []
            worker_failed: dict[str, str] = {}
            if todo:
                ray = self._ray()
                self._check_cache(ray, cache_target)
                ds = ray.data.from_items([{"text": t} for t in todo],
                                         override_num_blocks=max(1, min(-(-len(todo) // self.shard_size), 10_000)))
                mapped = ds.map_batches(
                    _Shard, batch_size=self.shard_size, batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=self.workers),
                    num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker or None,
                    fn_constructor_kwargs={"mixture": mixture, "class_names": list(class_names),
                                           "descriptions": dict(descriptions) if descriptions else None,
                                           "cache_target": cache_target},
                )
                done_pairs = hits
                with progress_bar("annotate (ray)", n_pairs, enabled=bool(progress and n_pairs), transient=False,
                                  completed=done_pairs) as bar:
                    if on_progress is not None:
                        on_progress(done_pairs, n_pairs)
                    for row in mapped.iter_rows():
                        rep = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                        reports.append(rep)
                        worker_failed.update(json.loads(rep["failed"]))
                        done_pairs += int(rep["pairs"])
                        bar.update(completed=min(done_pairs, n_pairs))
                        if on_progress is not None:
                            on_progress(min(done_pairs, n_pairs), n_pairs)
            # 3. the result, from the cache alone (again no model call; nothing to read again when nothing
            # was missing)
            res = before if not todo else mixture.annotate(texts, class_names, cache=store,
                                                          descriptions=descriptions, deadline=time.monotonic() - 1.0)
        finally:
            store.close()
        for i in res.pending_idx.tolist():
            res.failed[int(i)] = worker_failed.get(str(texts[i]), "no answer in the cache after the engine ran")
        st = res.stats
        secs = time.perf_counter() - t0
        st.update({
            "engine": "ray",
            "workers": self.workers,
            "shards": len(reports),
            "worker_pids": sorted({int(r["pid"]) for r in reports}),
            "cache_hits": hits,
            "cache_misses": n_pairs - hits,
            "annotated": sum(int(r["annotated"]) for r in reports),
            "failed": len(res.failed),
            "pending": 0,
            "seconds": secs,
            "model_seconds": sum(float(r["seconds"]) for r in reports),
            "texts_per_s": len(res.done_idx) / secs if secs > 0 else float("inf"),
            "deadline_reached": False,
        })
        # per annotator: the driver's cache hits and misses, the work the shards' own runs report
        shard_stats = [json.loads(r["per_annotator"]) for r in reports]
        for name, per in st["per_annotator"].items():
            per.update({k: before.stats["per_annotator"][name][k] for k in ("cache_hits", "cache_misses")})
            mine = [s[name] for s in shard_stats if name in s]
            per["annotated"] = sum(int(s["annotated"]) for s in mine)
            per["seconds"] = sum(float(s["seconds"]) for s in mine)
            tokens = [s["tokens"] for s in mine if s.get("tokens") is not None]
            per["tokens"] = sum(int(t) for t in tokens) if tokens else None
        tokens = [p["tokens"] for p in st["per_annotator"].values() if p["tokens"] is not None]
        st["tokens"] = sum(tokens) if tokens else None
        st["tokens_per_s"] = st["tokens"] / st["model_seconds"] if tokens and st["model_seconds"] > 0 else None
        return res


def shutdown() -> None:
    """Stop this process's Ray connection (and the local cluster it started)."""
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()
