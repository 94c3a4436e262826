"""A mixture of annotators: config loading, the offline default, and cached, deadline-bounded annotation.

Config (TOML or YAML)::

    task = "Questions people asked a search engine."   # optional: the task framing of every LLM prompt

    [descriptions]                  # optional: one line per class, in every LLM prompt and scorer label text
    human = "asks for a person or a group"

    [[annotator]]
    type = "openai"                 # openai | vllm | hf | embedding | replay
    name = "qwen"
    base_url = "http://localhost:8000/v1"
    model = "Qwen/Qwen2.5-7B-Instruct"
    api_key_env = "OPENAI_API_KEY"
    samples = 10

YAML: ``annotators: [{type: ..., name: ...}, ...]`` (``annotator`` is accepted too). ``descriptions`` and
``task`` may also sit in a ``[mixture]`` table. In Label Studio, a ``<Choice hint="...">`` describes its class
and the project's labelling instructions can frame the task (:mod:`molal.service.labelconfig`); they win over
the file's. A dataset preset's descriptions (an annotator's ``preset``) are the fallback for classes nobody
described.
"""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from molal.annotators.base import (
    Annotator,
    AnnotatorError,
    AnnotatorUnavailable,
    ConfigError,
    DeadlineReached,
    deadline_scope,
    stable_hash,
    validate_classes,
    validate_texts,
)
from molal.annotators.prompts import MAX_TASK_CHARS
from molal.datasets import CLASS_NAMES

if TYPE_CHECKING:
    from molal.cache import AnnotationCache
    from molal.data import LLMOutputs

TREC_CLASSES = list(CLASS_NAMES["trec"])
#: the longest class description a mixture file may give (characters): one line per class is the idea
MAX_DESCRIPTION_CHARS = 1000
TREC_LLMS = ["gemma", "llama", "mistral", "qwen", "yi"]
#: texts a local encoder embeds ahead in one call (sorted by length: a 256-text wave alone pads ~30% more)
PREFETCH_TEXTS = 1024


def _annotator_class(type_: str) -> type[Annotator]:
    if type_ == "embedding":
        from molal.annotators.embedding import EmbeddingAnnotator

        return EmbeddingAnnotator
    if type_ == "replay":
        from molal.annotators.replay import ReplayAnnotator

        return ReplayAnnotator
    if type_ == "hf":
        from molal.annotators.hf import HFAnnotator

        return HFAnnotator
    if type_ in ("openai", "openai_compat"):
        from molal.annotators.openai_compat import OpenAIAnnotator

        return OpenAIAnnotator
    if type_ == "vllm":
        from molal.annotators.vllm import VLLMAnnotator

        return VLLMAnnotator
    raise KeyError(type_)


ANNOTATOR_TYPES = ("openai", "vllm", "hf", "embedding", "replay")


def _with_task(annotator: Annotator, task: str) -> Annotator:
    """``annotator`` with the task framing ``task`` in its prompt (a shallow copy: a loaded model is shared);
    members without a prompt (scorers, recordings) as they are."""
    import copy

    p = getattr(annotator, "prompt", None)
    if p is None or not hasattr(p, "with_task") or p.task == task:
        return annotator
    a = copy.copy(annotator)
    a.prompt = p.with_task(task)
    return a


def build_annotator(spec: Mapping[str, Any], where: str = "annotator") -> Annotator:
    """One annotator from its spec (a dict with ``type``, ``name`` and the type's fields).

    Errors are :class:`ConfigError` naming ``where`` and the field."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a table of fields, got {type(spec).__name__}")
    spec = dict(spec)
    type_ = spec.pop("type", None)
    if type_ is None:
        raise ConfigError(f"{where}: missing field 'type' (one of {', '.join(ANNOTATOR_TYPES)})")
    try:
        cls = _annotator_class(str(type_))
    except KeyError:
        raise ConfigError(f"{where}: field 'type' = {type_!r} is not one of {', '.join(ANNOTATOR_TYPES)}") from None
    if "name" not in spec:
        raise ConfigError(f"{where}: missing field 'name'")
    where = f"{where} ({spec['name']!r})"
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p != "self" and params[p].kind not in (inspect.Parameter.VAR_KEYWORD,)]
    unknown = [k for k in spec if k not in allowed]
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} for type {type_!r}; allowed fields: {', '.join(allowed)}")
    missing = [p for p in allowed if params[p].default is inspect.Parameter.empty and p not in spec]
    if missing:
        raise ConfigError(f"{where}: missing field {missing[0]!r}")
    try:
        return cls(**spec)
    except (ValueError, TypeError, AnnotatorError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: mixture config not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the mixture config ({exc.strerror})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table at top level")
    return data


@dataclass
class MixtureResult:
    """outputs: LLMOutputs over the rows ``done_idx`` (in that order); failed: row -> reason; stats:
    cache_hits / cache_misses ((annotator, text) pairs), annotated, seconds, texts_per_s, tokens,
    tokens_per_s, per_annotator, deadline_reached. Rows neither done nor failed were cut by the deadline."""

    outputs: LLMOutputs
    done_idx: np.ndarray
    failed: dict[int, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def pending_idx(self) -> np.ndarray:
        """Rows neither done nor failed (cut by the deadline)."""
        n = int(self.stats.get("n_texts", 0))
        done = set(self.done_idx.tolist()) | set(self.failed)
        return np.array([i for i in range(n) if i not in done], dtype=np.int64)


class _AnnotationRun:
    """One :meth:`Mixture.annotate` call: the unique texts, the (annotator, text) results so far, the
    per-annotator stats, and the steps that fill them (cache lookup, waves of model calls, assembly)."""

    def __init__(self, mixture: Mixture, texts: list[str], names: list[str], desc: dict[str, str],
                 cache: AnnotationCache | None, deadline: float | None) -> None:
        self.annotators = mixture.annotators
        self.llm_names = mixture.llm_names
        self.texts, self.names, self.desc, self.cache, self.deadline = texts, names, desc, cache, deadline
        self.t0 = time.perf_counter()
        self.failed: dict[int, str] = dict(validate_texts(texts))  # row -> reason
        self.uniq: dict[str, list[int]] = {}  # unique text -> its rows
        for i, t in enumerate(texts):
            if i not in self.failed:
                self.uniq.setdefault(t, []).append(i)
        self.u_texts = list(self.uniq)
        nu, n_llm, k = len(self.u_texts), len(self.annotators), len(names)
        self.probs = np.full((nu, n_llm, k), np.nan)
        self.cons = np.full((nu, n_llm, k), np.nan)
        self.has_cons = [a.samples > 0 for a in self.annotators]
        self.u_failed: dict[int, list[str]] = {}  # unique text -> "annotator: reason" of each failure
        self.per: dict[str, dict[str, Any]] = {
            a.name: {"cache_hits": 0, "cache_misses": 0, "annotated": 0, "failed": 0, "seconds": 0.0, "tokens": None}
            for a in self.annotators}
        self.idents = [mixture.cache_identity(a, names, desc) for a in self.annotators]
        self.dead: dict[int, str] = {}  # annotator -> why it is unavailable for the rest of the run
        self.steps = 0  # (annotator, unique text) pairs done or cached
        self.deadline_hit = False
        self.lock = threading.Lock()

    def from_cache(self) -> list[list[int]]:
        """Fill what the cache holds; returns, per annotator, the unique texts still to annotate."""
        from molal.cache import text_key

        nu, k = len(self.u_texts), len(self.names)
        todo: list[list[int]] = []
        keys = [text_key(t) for t in self.u_texts] if self.cache is not None else None  # hashed once
        for j, a in enumerate(self.annotators):
            st = self.per[a.name]
            miss = list(range(nu))
            if self.cache is not None and nu:
                miss = []
                for u, g in enumerate(self.cache.get_many(self.idents[j], self.u_texts, n_classes=k, keys=keys)):
                    if g is None:
                        miss.append(u)
                        continue
                    self.probs[u, j] = g[0]
                    if g[1] is not None:
                        self.cons[u, j] = g[1]
                        self.has_cons[j] = True
                st["cache_hits"] = nu - len(miss)
            st["cache_misses"] = len(miss)
            todo.append(miss)
        self.steps = sum(s["cache_hits"] for s in self.per.values())
        return todo

    def plan(self, todo: list[list[int]]) -> list[list[tuple[int, list[int]]]]:
        """The work as waves of (annotator, unique rows) steps: chunk-major (rows complete early, good under a
        deadline) unless an annotator needs the accelerator to itself (vLLM in-process), then annotator-major
        so each model is loaded once."""
        waves: list[list[tuple[int, list[int]]]] = []
        if self.exclusive:
            for j, miss in enumerate(todo):
                bs = self.annotators[j].batch_size
                waves += [[(j, miss[s : s + bs])] for s in range(0, len(miss), bs)]
            return waves
        chunk = min(256, max(a.batch_size for a in self.annotators))
        pos = [0] * len(self.annotators)
        for start in range(0, len(self.u_texts), chunk):
            wave = []
            for j, miss in enumerate(todo):
                part = []
                while pos[j] < len(miss) and miss[pos[j]] < start + chunk:
                    part.append(miss[pos[j]])
                    pos[j] += 1
                bs = self.annotators[j].batch_size
                wave += [(j, part[s : s + bs]) for s in range(0, len(part), bs)]
            if wave:
                waves.append(wave)
        return waves

    @property
    def exclusive(self) -> bool:
        return any(getattr(a, "exclusive", False) for a in self.annotators)

    def fail(self, j: int, us: list[int], reason: str) -> None:
        name = self.annotators[j].name
        with self.lock:
            for u in us:
                self.u_failed.setdefault(u, []).append(f"{name}: {reason}")
            self.per[name]["failed"] += len(us)

    def step(self, j: int, us: list[int]) -> bool:
        """Annotate rows ``us`` with annotator j (results cached); False when skipped because the deadline
        passed or cut the call short (the rows stay pending, not failed)."""
        a = self.annotators[j]
        st = self.per[a.name]
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if j in self.dead:
            self.fail(j, us, self.dead[j])
            return True
        ta = time.perf_counter()
        res = None
        try:
            with deadline_scope(self.deadline):
                res = a.annotate([self.u_texts[u] for u in us], self.names, self.desc)
        except DeadlineReached:
            with self.lock:
                st["seconds"] += time.perf_counter() - ta
            return False
        except AnnotatorUnavailable as exc:
            with self.lock:
                self.dead.setdefault(j, str(exc))
            res = getattr(exc, "partial", None)  # rows answered before the backend went away: keep them
            if res is None:
                self.fail(j, us, self.dead[j])
        except AnnotatorError as exc:
            self.fail(j, us, str(exc))
        with self.lock:
            st["seconds"] += time.perf_counter() - ta
        if res is None:
            return True
        ok = [m for m in range(len(us)) if m not in res.failed]
        for m, reason in res.failed.items():
            self.fail(j, [us[m]], reason)
        if ok:
            rows = [us[m] for m in ok]
            self.probs[rows, j] = res.probs[ok]
            if res.consistency is not None:
                self.cons[rows, j] = res.consistency[ok]
            if self.cache is not None:
                self.cache.put_many(self.idents[j], [self.u_texts[u] for u in rows], res.probs[ok],
                                    None if res.consistency is None else res.consistency[ok])
        with self.lock:
            st["annotated"] += len(ok)
            if res.tokens is not None:
                st["tokens"] = (st["tokens"] or 0) + res.tokens
        return True

    def prefetch(self, waves: list[list[tuple[int, list[int]]]], w: int) -> int:
        """Let the local annotators that can (``prefetch``: the embedding scorers) embed the texts of waves
        ``w``, ``w + 1``, ... (up to :data:`PREFETCH_TEXTS` texts) in one call, so they are encoded sorted by
        length rather than a batch at a time in arrival order. Returns the first wave not covered."""
        can = {j for j, a in enumerate(self.annotators) if callable(getattr(a, "prefetch", None))
               and not getattr(a, "remote", False) and j not in self.dead}
        if not can:
            return len(waves)
        rows: dict[int, dict[int, None]] = {}
        end = w
        while end < len(waves) and (end == w or max((len(r) for r in rows.values()), default=0) < PREFETCH_TEXTS):
            for j, us in waves[end]:
                if j in can:
                    rows.setdefault(j, {}).update(dict.fromkeys(us))
            end += 1
        for j, us in rows.items():
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self.deadline_hit = True
                break
            ta, tokens = time.perf_counter(), None
            try:
                with deadline_scope(self.deadline):
                    tokens = self.annotators[j].prefetch([self.u_texts[u] for u in us])
            except DeadlineReached:
                self.deadline_hit = True
                break
            except AnnotatorError:
                pass  # the annotator's own calls report it, row by row
            finally:
                with self.lock:  # the annotator's time and tokens: its stats stay true
                    st = self.per[self.annotators[j].name]
                    st["seconds"] += time.perf_counter() - ta
                    if tokens:
                        st["tokens"] = (st["tokens"] or 0) + int(tokens)
        return end

    def run(self, waves: list[list[tuple[int, list[int]]]], report: Callable[[str], None]) -> None:
        """Run the waves until done or the deadline. Within a wave, remote annotators (HTTP servers) run
        concurrently with each other and with the local ones; local ones run one after another."""
        remote = [bool(getattr(a, "remote", False)) for a in self.annotators]
        exclusive = self.exclusive
        pool = ThreadPoolExecutor(max_workers=max(1, sum(remote))) if any(remote) and not exclusive else None

        def done(j: int, us: list[int], ok: bool) -> None:
            if ok:
                self.steps += len(us)
                report(self.annotators[j].name)
            else:
                self.deadline_hit = True

        try:
            report("")
            ahead = 0  # waves whose texts the local encoders have embedded ahead (prefetch)
            for w, wave in enumerate(waves):
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    self.deadline_hit = True
                    break
                if w >= ahead:
                    ahead = self.prefetch(waves, w)
                    if self.deadline_hit:
                        break
                futures = {pool.submit(self.step, j, us): (j, us) for j, us in wave if remote[j]} if pool else {}
                for j, us in wave:
                    if pool is None or not remote[j]:
                        done(j, us, self.step(j, us))
                for f in as_completed(futures):
                    done(*futures[f], f.result())
                if exclusive:
                    j = wave[0][0]
                    if w + 1 == len(waves) or waves[w + 1][0][0] != j:
                        self.annotators[j].close()  # free the accelerator before the next model
                if self.deadline_hit:
                    break
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def result(self) -> MixtureResult:
        """The rows every annotator answered (as LLMOutputs), the failed rows and the stats."""
        from molal.data import LLMOutputs

        texts, n, nu = self.texts, len(self.texts), len(self.u_texts)
        n_llm, k = len(self.annotators), len(self.names)
        failed = self.failed
        u_done = [u for u in range(nu) if u not in self.u_failed and np.isfinite(self.probs[u]).all()]
        for u, reasons in self.u_failed.items():
            for i in self.uniq[self.u_texts[u]]:
                failed[i] = "; ".join(reasons)
        row_u = {i: u for u, t in enumerate(self.u_texts) for i in self.uniq[t]}
        done_set = set(u_done)
        done_idx = np.array([i for i in range(n) if i in row_u and row_u[i] in done_set], dtype=np.int64)
        sel = [row_u[i] for i in done_idx]
        p = self.probs[sel] if sel else np.zeros((0, n_llm, k))
        c = None
        if any(self.has_cons):
            c = self.cons[sel] if sel else np.zeros((0, n_llm, k))
            for j in range(n_llm):  # annotators without sampling: argmax one-hot (as LLMOutputs.concat_llms)
                missing = ~np.isfinite(c[:, j]).all(axis=1)  # only rows without sampled answers
                if missing.any():
                    oh = np.zeros((int(missing.sum()), k))
                    oh[np.arange(len(oh)), p[missing, j].argmax(axis=1)] = 1.0
                    c[missing, j] = oh
        outputs = LLMOutputs(p, c, class_names=self.names, llm_names=self.llm_names, texts=[texts[i] for i in done_idx])
        per = self.per
        secs = time.perf_counter() - self.t0
        model_secs = sum(s["seconds"] for s in per.values())
        tokens = [s["tokens"] for s in per.values() if s["tokens"] is not None]
        stats = {
            "n_texts": n,
            "n_unique": nu,
            "done": int(len(done_idx)),
            "failed": len(failed),
            "pending": n - len(done_idx) - len(failed),
            "cache_hits": sum(s["cache_hits"] for s in per.values()),
            "cache_misses": sum(s["cache_misses"] for s in per.values()),
            "annotated": sum(s["annotated"] for s in per.values()),
            "seconds": secs,
            "model_seconds": model_secs,
            "texts_per_s": len(done_idx) / secs if secs > 0 else float("inf"),
            "tokens": sum(tokens) if tokens else None,
            "tokens_per_s": (sum(tokens) / model_secs) if tokens and model_secs > 0 else None,
            "deadline_reached": self.deadline_hit,
            "per_annotator": per,
        }
        return MixtureResult(outputs=outputs, done_idx=done_idx, failed=failed, stats=stats)


class Mixture:
    """An ordered list of annotators with unique names (the LLMOutputs ``llm_names``)."""

    def __init__(self, annotators: Sequence[Annotator], descriptions: Mapping[str, str] | None = None,
                 task: str | None = None) -> None:
        annotators = list(annotators)
        if not annotators:
            raise ValueError("a mixture needs at least one annotator")
        names = [a.name for a in annotators]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"annotator names must be unique; duplicated: {dup}")
        #: class -> description (a mixture file's ``descriptions``, Label Studio's hints): every member gets them
        self.descriptions = {c: " ".join(str(d).split()) for c, d in (descriptions or {}).items() if str(d).strip()}
        #: the task framing of every LLM member's prompt ("" = none)
        self.task = " ".join((task or "").split())
        if self.task:
            annotators = [_with_task(a, self.task) for a in annotators]
        self.annotators = annotators
        #: the labelled tasks :meth:`with_seed_examples` filled ``examples = "seeds"`` prompts from (else None)
        self.seed_examples: list[dict[str, str]] | None = None

    @property
    def llm_names(self) -> list[str]:
        return [a.name for a in self.annotators]

    def wants_seed_examples(self) -> bool:
        """Whether a member's prompt takes its few-shot examples from the project's labels (``examples = "seeds"``)."""
        return any(getattr(getattr(a, "prompt", None), "examples_from", None) == "seeds" for a in self.annotators)

    def with_seed_examples(self, labelled: Sequence[Mapping[str, str]]) -> Mixture:
        """A mixture whose ``examples = "seeds"`` prompts hold examples from ``labelled`` (``{"text", "label"}``,
        preferred first); other members are the same objects. The members that change are shallow copies
        (a model loaded already is shared)."""
        import copy

        out = []
        for a in self.annotators:
            p = getattr(a, "prompt", None)
            if getattr(p, "examples_from", None) == "seeds":
                a = copy.copy(a)
                a.prompt = p.with_seed_examples(labelled)
            out.append(a)
        mix = Mixture(out, descriptions=self.descriptions, task=self.task)
        mix.seed_examples = [dict(e) for e in labelled]
        return mix

    def with_context(self, descriptions: Mapping[str, str] | None = None, task: str | None = None) -> Mixture:
        """A mixture whose members also get ``descriptions`` (class -> one line; they win over this
        mixture's own for the classes they describe) and, when ``task`` is given, that task framing in every
        LLM member's prompt (in place of this mixture's). What Label Studio says about a project's classes
        (``<Choice hint>``) and task (its labelling instructions) reaches the members this way. Members whose
        prompt does not change are the same objects; ``self`` when nothing changes."""
        desc = {**self.descriptions, **{c: d for c, d in (descriptions or {}).items() if str(d).strip()}}
        task = self.task if task is None else " ".join(task.split())
        if desc == self.descriptions and task == self.task:
            return self
        mix = Mixture(self.annotators, descriptions=desc, task=task)
        if task != self.task and not task:  # framing removed: the members' prompts lose it
            mix.annotators = [_with_task(a, "") for a in mix.annotators]
        mix.seed_examples = self.seed_examples
        return mix

    def member_versions(self) -> list[str]:
        """The model version of each member's own predictions in Label Studio: ``llm:<name>`` for a language
        model, ``scorer:<name>`` for an embedding scorer (so a reviewer can tell them apart)."""
        return [f"{a.kind}:{a.name}" for a in self.annotators]

    def __len__(self) -> int:
        return len(self.annotators)

    def __repr__(self) -> str:
        return f"Mixture({', '.join(f'{a.type}:{a.name}' for a in self.annotators)})"

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_specs(cls, specs: Sequence[Mapping[str, Any]], where: str = "mixture", descriptions=None,
                   task: str | None = None) -> Mixture:
        if not isinstance(specs, Sequence) or isinstance(specs, (str, bytes)) or not specs:
            raise ConfigError(f"{where}: no annotators (add at least one [[annotator]] table)")
        anns = [build_annotator(s, f"{where}: annotator #{i + 1}") for i, s in enumerate(specs)]
        try:
            return cls(anns, descriptions=descriptions, task=task)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    @classmethod
    def from_config(cls, path: str | os.PathLike[str]) -> Mixture:
        """Load a TOML (``[[annotator]]`` tables) or YAML (``annotators:`` list) mixture config."""
        p = Path(path)
        data = _read_config(p)
        unknown = [k for k in data if k not in ("annotator", "annotators", "mixture", "descriptions", "task")]
        if unknown:
            raise ConfigError(f"{p}: unknown top-level field {unknown[0]!r} (expected 'annotator' tables and optional "
                              "'descriptions', 'task' and 'mixture')")
        specs = data.get("annotator", data.get("annotators"))
        if specs is None:
            raise ConfigError(f"{p}: no annotators (add at least one [[annotator]] table)")
        if isinstance(specs, Mapping):
            specs = [specs]
        mix = data.get("mixture", {}) or {}
        if not isinstance(mix, Mapping):
            raise ConfigError(f"{p}: field 'mixture' must be a table")
        bad = [k for k in mix if k not in ("descriptions", "task")]
        if bad:
            raise ConfigError(f"{p}: unknown field 'mixture.{bad[0]}' (allowed: descriptions, task)")
        desc: dict[str, str] = {}
        for where, table in (("mixture.descriptions", mix.get("descriptions")), ("descriptions", data.get("descriptions"))):
            if table is None:
                continue
            if not isinstance(table, Mapping) or not all(isinstance(v, str) for v in table.values()):
                raise ConfigError(f"{p}: field {where!r} must be a table class name -> one line of text")
            long_ = [k for k, v in table.items() if len(v) > MAX_DESCRIPTION_CHARS]
            if long_:
                raise ConfigError(f"{p}: {where}.{long_[0]} has over {MAX_DESCRIPTION_CHARS} characters (one line "
                                  "per class is the idea)")
            desc.update(table)
        task = data.get("task", mix.get("task"))
        if task is not None and (not isinstance(task, str) or len(task) > MAX_TASK_CHARS):
            raise ConfigError(f"{p}: field 'task' must be a string of at most {MAX_TASK_CHARS} characters")
        return cls.from_specs(specs, where=str(p), descriptions=desc, task=task)

    @classmethod
    def default(
        cls,
        texts: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        descriptions: Mapping[str, str] | None = None,
    ) -> Mixture:
        """Offline default: the 5 recorded TREC LLMs (replay) when the bundled recording covers every text
        (and the classes are TREC's), else embedding zero-shot scorers with varied prompt templates."""
        from molal.annotators.embedding import DEFAULT_VARIANTS, EmbeddingAnnotator

        texts = [t for t in (texts or []) if isinstance(t, str) and t.strip()]
        classes_ok = class_names is None or sorted(class_names) == sorted(TREC_CLASSES)
        if texts and classes_ok:
            from molal.annotators.replay import ReplayAnnotator

            replay = [ReplayAnnotator(name=m, source="bundled:trec") for m in TREC_LLMS]
            if replay[0].covers(texts) == 1.0:
                return cls(replay)
        variants = [v for v in DEFAULT_VARIANTS if v[0] != "emb-desc" or descriptions]
        return cls([EmbeddingAnnotator(name=n, templates=t) for n, t in variants], descriptions=descriptions)

    def needs_described_default(self, descriptions: Mapping[str, str]) -> bool:
        """Whether this is the offline default of embedding scorers built without descriptions while
        ``descriptions`` now exist (then :meth:`default` with them adds the description scorer)."""
        from molal.annotators.embedding import DEFAULT_VARIANTS

        names = [n for n, _ in DEFAULT_VARIANTS if n != "emb-desc"]
        return bool(descriptions) and self.llm_names == names

    # -- annotation ------------------------------------------------------------------------------------
    def cache_identity(self, annotator: Annotator, class_names: Sequence[str], descriptions: Mapping[str, str]) -> dict:
        """What keys an annotator's answers in the cache: its identity + the class list + descriptions."""
        return {
            "annotator": annotator.identity(),
            "class_names": list(class_names),
            "descriptions": {c: descriptions[c] for c in class_names if c in descriptions},
        }

    def annotate(
        self,
        texts: Sequence[str],
        class_names: Sequence[str],
        *,
        cache: AnnotationCache | None = None,
        descriptions: Mapping[str, str] | None = None,
        progress: bool = False,
        deadline: float | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> MixtureResult:
        """Annotate ``texts`` with every annotator; cache first, only misses go to the models.

        ``deadline`` (a ``time.monotonic()`` value): no model call starts after it; rows not complete
        then are neither in ``done_idx`` nor in ``failed``. Failed rows are never cached.
        ``on_progress(done_steps, total_steps)`` is called as (annotator, text) pairs complete."""
        from molal.progress import progress_bar

        names = validate_classes(class_names, descriptions)
        desc = dict(self.descriptions)
        desc.update(descriptions or {})
        run = _AnnotationRun(self, list(texts), names, {c: d for c, d in desc.items() if c in names}, cache, deadline)
        todo = run.from_cache()
        total = len(run.u_texts) * len(self.annotators)
        with progress_bar("annotate", total, enabled=bool(progress and total), transient=False,
                          completed=run.steps) as bar:

            def report(name: str) -> None:
                bar.update(completed=run.steps, description=f"annotate {name}" if name else "annotate")
                if on_progress is not None:
                    on_progress(run.steps, total)

            run.run(run.plan(todo), report)
        return run.result()

    def identity(self) -> list[dict[str, Any]]:
        return [a.identity() for a in self.annotators]

    def fingerprint(self) -> str:
        """sha256 of the annotators' identities and the class descriptions (changes when any annotator would
        answer differently)."""
        if self.descriptions:  # only then: mixtures without descriptions keep their fingerprint
            return stable_hash({"annotators": self.identity(), "descriptions": dict(sorted(self.descriptions.items()))})
        return stable_hash(self.identity())

    def close(self) -> None:
        for a in self.annotators:
            a.close()
