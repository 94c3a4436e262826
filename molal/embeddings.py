"""Sentence embeddings: molal's one way to embed text.

Every stage that embeds text goes through :func:`embed`: the embedding scorers
(:mod:`molal.annotators.embedding`), the student's frozen encoder (:mod:`molal.student`, and through it the
diversity strategies of :mod:`molal.query`) and MoLAM's text model (:mod:`molal.aggregation.text_model`).

* **The encoder** is a local HF folder (``"minilm"`` = the bundled all-MiniLM-L6-v2, loaded offline) run by
  sentence-transformers as a Transformer + mean-Pooling model (the pooling molal's student uses too). It is
  loaded once per (folder, device, quantization) and process. ``MOLAL_ENCODER_QUANTIZE=int8`` runs it with
  int8 dynamic quantization of its linear layers (opt-in: faster on CPU, a different model; bench/RESULTS.md).
* **Computed once.** A text's embedding is looked up in a process-wide LRU, then in the persistent
  :class:`EmbeddingStore` (beside the annotation cache: the same SQLite file or PostgreSQL database, see
  :func:`use_store`), and computed only when neither has it. The texts computed are sorted by token length
  (little padding) and encoded in slices of a few batches: each slice is stored as soon as it is done (a run
  killed mid-way keeps it), and a caller's deadline is checked between slices.
* **Keys.** An embedding is keyed by the encoder's *space* (a SHA-256 of its weight, config and tokenizer
  files, the pooling and the quantization), the text, and where it was cut: a text shorter than the max
  length is stored as a *whole text* (valid for any max length at least its token count), a longer one under
  the max length it was truncated at. So the scorers at 128 tokens and the student at 64 share every text of
  up to 63 tokens.
* **Long texts are cut before tokenising** (:func:`clip_texts`): an encoder reads only its first ``max_length``
  tokens, and tokenising a whole 32,000-character text to keep 128 of its tokens costs ~15x the time and
  memory. The cut keeps those tokens exactly (checked with the tokenizer itself), so embeddings do not change.
  The process's LRU is keyed by a digest of the text (:func:`text_digest`), so it holds no texts.
* **Vectors** are stored as computed: mean-pooled, float32, not normalised (the student's head reads them as
  they are); :func:`embed` normalises them for the callers that want unit vectors (``normalize=True``).

molal keeps its own code for two things only: the token counts (one fast tokenizer pass, for the cost
accounting and the whole-text keys: sentence-transformers does not return them) and
:func:`dropout_embeddings`, the scorers' MC-dropout passes (sentence-transformers always encodes in eval mode).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from molal.lru import LRU

log = logging.getLogger(__name__)

#: ``MOLAL_ENCODER_QUANTIZE`` values
QUANTIZE_MODES = ("none", "int8")
#: the process-wide LRU of embeddings: at most this many texts and this many bytes (≈ 200k MiniLM vectors)
MEMORY_TEXTS = 200_000
MEMORY_BYTES = 320 * 2**20
#: texts per slice = this many batches (progress, deadline checks and store commits happen between slices)
SLICE_BATCHES = 8
#: the store's default bound (MOLAL_EMBEDDING_STORE_MB): ≈ 600k MiniLM vectors
STORE_MB = 1024
#: texts longer than this many characters per token of ``max_length`` are cut before tokenising (a token is
#: rarely over 10 characters; the cut is checked, so this only decides how much is tokenised to check it)
CLIP_CHARS_PER_TOKEN = 12


class EncoderError(RuntimeError):
    """The encoder cannot be loaded (missing folder, unreadable weights) or is misconfigured."""


class EmbeddingDeadline(RuntimeError):
    """The caller's deadline passed between two slices; what was computed before it is kept (memory, store)."""


def text_digest(text: str) -> bytes:
    """A 16-byte digest of ``text`` (cache keys that must not hold the text itself)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def clip_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[str]:
    """``texts`` with each long one cut to a prefix that the tokenizer turns into the same first ``max_length``
    tokens as the whole text: what an encoder truncating at ``max_length`` reads is unchanged, and a
    32,000-character text costs the tokenizer ~1,500 characters instead.

    A text over ``CLIP_CHARS_PER_TOKEN * max_length`` characters is cut before a space (where every
    tokenizer molal uses ends a word: BERT WordPiece, byte-level BPE, SentencePiece), the trailing spaces
    dropped; the prefix is kept only when it alone gives at least ``max_length`` tokens. Otherwise (mostly
    spaces, or no space: a long run of one script without spaces) a 4x longer prefix is tried, and at
    last the whole text."""
    out = list(texts)
    width = CLIP_CHARS_PER_TOKEN * max(int(max_length), 1)
    todo = [i for i, t in enumerate(out) if len(t) > width]
    while todo:
        cands: dict[int, str] = {}
        for i in todo:
            cut = out[i].rfind(" ", 0, width)
            prefix = out[i][:cut].rstrip(" ") if cut > 0 else ""
            if prefix:
                cands[i] = prefix
        if cands:
            ids = tokenizer(list(cands.values()), add_special_tokens=False, truncation=True,
                            max_length=max_length)["input_ids"]
            for (i, prefix), n in zip(cands.items(), map(len, ids), strict=True):
                if n >= max_length:
                    out[i] = prefix
        width *= 4
        todo = [i for i in todo if out[i] is texts[i] and len(out[i]) > width]
    return out


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def quantization() -> str:
    """The encoder quantization in force: ``MOLAL_ENCODER_QUANTIZE`` (``none`` or ``int8``; default none)."""
    v = (os.environ.get("MOLAL_ENCODER_QUANTIZE") or "none").strip().lower()
    if v not in QUANTIZE_MODES:
        raise EncoderError(f"MOLAL_ENCODER_QUANTIZE={v!r}: use one of {', '.join(QUANTIZE_MODES)}")
    return v


# -- the encoder ---------------------------------------------------------------------------------------------
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def _weight_files(path: Path) -> list[Path]:
    names = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    return names + [f for f in (path / "config.json", path / "tokenizer.json", path / "vocab.txt") if f.exists()]


class Encoder:
    """One loaded encoder: a sentence-transformers model (Transformer + mean Pooling) on one device."""

    def __init__(self, path: str, device: str, quantize: str) -> None:
        from molal.resources import offline_env

        offline_env()
        self.path, self.device, self.quantize = path, device, quantize
        try:
            import torch
            from sentence_transformers import SentenceTransformer

            try:
                from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
            except ImportError:  # pragma: no cover - sentence-transformers < 6
                from sentence_transformers.models import Pooling, Transformer
            if not Path(path).is_dir():
                raise OSError(f"no such model folder: {path}")
            tr = Transformer(path)
            self.dim = int(tr.auto_model.config.hidden_size)
            st = SentenceTransformer(modules=[tr, Pooling(self.dim, "mean")], device=device)
            if quantize == "int8":
                st = torch.ao.quantization.quantize_dynamic(st, {torch.nn.Linear}, dtype=torch.qint8)
            st.eval()
        except (OSError, ValueError, RuntimeError) as exc:
            raise EncoderError(f"cannot load the encoder from {path}: {exc}") from exc
        self.st = st
        self.tokenizer = tr.tokenizer
        self.lock = threading.Lock()  # one encode at a time per model (the fast tokenizer is not reentrant)
        self._dropout = None
        self._space: str | None = None

    @property
    def hf_model(self) -> Any:
        """The underlying transformers model (what a forward hook counts)."""
        return self.st[0].auto_model

    @property
    def space(self) -> str:
        """SHA-256 of what makes this encoder's vectors: its files' contents, the pooling, the quantization."""
        if self._space is None:
            p = Path(self.path)
            ident = {"files": {f.name: _file_sha256(f) for f in _weight_files(p)}, "pooling": "mean",
                     "quantize": self.quantize, "format": 1}
            self._space = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        return self._space

    def clip(self, texts: Sequence[str], max_length: int) -> list[str]:
        """:func:`clip_texts` with this encoder's tokenizer: the same tokens read, a fraction of the work."""
        with self.lock:
            return clip_texts(self.tokenizer, texts, int(max_length))

    def token_counts(self, texts: Sequence[str], max_length: int) -> np.ndarray:
        """Tokens of each text, special tokens included, cut at ``max_length`` (what the encoder reads). Pass
        texts already cut by :meth:`clip` (the counts are the same, the work a fraction)."""
        with self.lock:
            ids = self.tokenizer(list(texts), truncation=True, max_length=int(max_length))["input_ids"]
        return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(texts))

    def encode(self, texts: Sequence[str], max_length: int, batch_size: int) -> np.ndarray:
        """(n, d) float32 mean-pooled vectors (not normalised), one sentence-transformers ``encode``."""
        with self.lock:
            return np.asarray(self.st.encode(list(texts), batch_size=int(batch_size), convert_to_numpy=True,
                                             show_progress_bar=False,
                                             processing_kwargs={"text": {"max_length": int(max_length)}}),
                              dtype=np.float32)

    def dropout_model(self) -> Any:
        """A copy of the transformer kept in train mode (MC dropout), so eval-mode encodes never see it."""
        with self.lock:
            if self._dropout is None:
                self._dropout = copy.deepcopy(self.hf_model).train()
            return self._dropout


_ENCODERS: dict[tuple[str, str, str], Encoder] = {}
_ENCODERS_LOCK = threading.Lock()


def encoder(model: str = "minilm", device: str = "cpu") -> Encoder:
    """The process's :class:`Encoder` for a folder (``"minilm"`` = bundled), device and quantization."""
    from molal.resources import resolve_model_path

    path = resolve_model_path(model)
    key = (path, resolve_device(device), quantization())
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = Encoder(*key)
        return _ENCODERS[key]


def load_encoder(model: str = "minilm", device: str = "cpu") -> tuple[Any, Any]:
    """(tokenizer, transformers model) of the process's encoder."""
    enc = encoder(model, device)
    return enc.tokenizer, enc.hf_model


def model_fingerprint(model: str) -> dict[str, Any]:
    """Install-independent identity of an encoder for the annotation cache: its name and the sizes of its
    weight/config files (so a cache survives moving the venv, but not swapping the weights), plus the
    quantization when one is in force."""
    from molal.resources import resolve_model_path

    path = Path(resolve_model_path(model))
    files = {}
    if path.is_dir():
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + [path / "config.json", path / "tokenizer.json"]:
            if f.exists():
                files[f.name] = f.stat().st_size
    name = "all-MiniLM-L6-v2" if str(path) == resolve_model_path("minilm") else model
    out: dict[str, Any] = {"name": name, "files": files}
    if quantization() != "none":
        out["quantize"] = quantization()
    return out


# -- the store -----------------------------------------------------------------------------------------------
STORE_SCHEMA_VERSION = 1
_CHUNK = 500
_TOUCH_S = 3600.0  # a hit refreshes a row's last use at most this often (eviction is least recently used)
_ROW_OVERHEAD = 160  # bytes per row beyond the vector (key, hash, index), for the bound in MB

_STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS embedding_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS embedding_spaces (space TEXT PRIMARY KEY, identity_json TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS embeddings (
    space TEXT NOT NULL, text_hash TEXT NOT NULL, cut INTEGER NOT NULL, n_tokens INTEGER NOT NULL,
    vec BLOB NOT NULL, crc INTEGER NOT NULL, used REAL NOT NULL,
    PRIMARY KEY (space, text_hash, cut)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS embeddings_used ON embeddings (used);
"""


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _crc(space: str, text_hash: str, cut: int, n_tokens: int, vec: bytes) -> int:
    return zlib.crc32(vec, zlib.crc32(f"{space}\x1f{text_hash}\x1f{cut}\x1f{n_tokens}".encode()))


class EmbeddingStore:
    """Embeddings kept across processes, in the annotation cache's database (a SQLite file or a
    ``postgresql://`` URL), bounded by ``max_mb`` (least recently used rows evicted first).

    Rows: (space, sha256 of the text, cut = 0 for a whole text or the max length it was truncated at, token
    count, float32 vector, CRC-32 of all of these, last use). A row that fails its checks (a CRC that does not
    match, a wrong length, a non-finite value) is read as missing, so it is computed again and overwritten.
    Every failure of the database itself is logged and read as a miss / a skipped write: the store can make
    molal faster, never wrong and never down."""

    def __init__(self, target: str | os.PathLike[str], max_mb: float = STORE_MB, timeout: float = 30.0) -> None:
        self.target = str(target)
        self.max_mb = float(max_mb)
        self.timeout = float(timeout)
        self._db: Any = None
        self._lock = threading.Lock()
        self._estimate: int | None = None
        self._spaces: set[str] = set()
        self._said: set[str] = set()

    # -- plumbing ----------------------------------------------------------------------------------------
    def db(self) -> Any:
        with self._lock:
            if self._db is None:
                from molal.db import open_database

                db = open_database(self.target, _STORE_SCHEMA, "embeddings", max_idle=2, timeout=self.timeout)
                row = db.execute("SELECT value FROM embedding_meta WHERE key='schema_version'").fetchone()
                if row is None:
                    db.execute("INSERT INTO embedding_meta(key, value) VALUES('schema_version', ?) "
                               "ON CONFLICT DO NOTHING", (str(STORE_SCHEMA_VERSION),))
                elif int(row[0]) > STORE_SCHEMA_VERSION:
                    raise RuntimeError(f"embedding store schema {row[0]} is newer than this molal's")
                self._db = db
            return self._db

    def _failed(self, what: str, exc: BaseException) -> None:
        from molal.db import describe, first_line

        why = f"{type(exc).__name__}: {first_line(exc)[:200]}"
        if why not in self._said:  # once per cause, not once per call
            self._said.add(why)
            log.warning("embedding store %s: %s failed (%s); computing instead", describe(self.target), what, why)

    def max_rows(self, dim: int) -> int:
        return max(1, int(self.max_mb * 2**20 // (4 * dim + _ROW_OVERHEAD)))

    # -- API -----------------------------------------------------------------------------------------------
    def get(self, space: str, texts: Sequence[str], max_length: int, dim: int) -> dict[str, tuple[int, int, np.ndarray]]:
        """``{text: (cut, n_tokens, vector)}`` for the texts stored with a vector valid at ``max_length``."""
        if self.max_mb <= 0 or not texts:
            return {}
        try:
            db = self.db()
            by_hash = {_text_hash(t): t for t in texts}
            hashes = list(by_hash)
            out: dict[str, tuple[int, int, np.ndarray]] = {}
            stale: list[str] = []
            now = time.time()
            for s in range(0, len(hashes), _CHUNK):
                part = hashes[s : s + _CHUNK]
                q = ("SELECT text_hash, cut, n_tokens, vec, crc, used FROM embeddings WHERE space=? AND text_hash IN "
                     f"({','.join('?' * len(part))}) AND (cut=? OR (cut=0 AND n_tokens<=?))")
                rows = db.retry(lambda q=q, part=part: db.execute(q, [space, *part, int(max_length), int(max_length)]))
                for th, cut, n_tok, vec, crc, used in rows:
                    vec = bytes(vec)
                    if len(vec) != 4 * dim or _crc(space, th, int(cut), int(n_tok), vec) != int(crc):
                        continue  # corrupt: computed again (and overwritten)
                    v = np.frombuffer(vec, dtype=np.float32).copy()
                    if not np.isfinite(v).all():
                        continue
                    t = by_hash[th]
                    if t not in out or int(cut) != 0:  # the truncated row is the exact one when both exist
                        out[t] = (int(cut), int(n_tok), v)
                    if now - float(used) > _TOUCH_S:
                        stale.append(th)
            for s in range(0, len(stale), _CHUNK):
                part = stale[s : s + _CHUNK]
                q = f"UPDATE embeddings SET used=? WHERE space=? AND text_hash IN ({','.join('?' * len(part))})"
                db.retry(lambda q=q, part=part: db.execute(q, [now, space, *part]))
            return out
        except Exception as exc:  # noqa: BLE001 - the store is an optimisation: a failure is a miss
            self._failed("a read", exc)
            return {}

    def put(self, space: str, identity: dict[str, Any], rows: Sequence[tuple[str, int, int, np.ndarray]]) -> int:
        """Store ``(text, cut, n_tokens, vector)`` rows in one transaction; returns how many (0 on failure)."""
        if self.max_mb <= 0 or not rows:
            return 0
        now = time.time()
        recs = []
        dim = 0
        for text, cut, n_tok, v in rows:
            v = np.ascontiguousarray(v, dtype=np.float32)
            if v.ndim != 1 or not np.isfinite(v).all():
                continue
            dim = v.shape[0]
            th, blob = _text_hash(text), v.tobytes()
            recs.append((space, th, int(cut), int(n_tok), blob, _crc(space, th, int(cut), int(n_tok), blob), now))
        recs.sort(key=lambda r: (r[1], r[2]))  # one key order for every writer: concurrent upserts cannot deadlock
        try:
            db = self.db()

            def tx() -> None:
                with db.transaction(exclusive=db.dialect == "sqlite") as c:
                    if space not in self._spaces:
                        c.execute("INSERT INTO embedding_spaces(space, identity_json, created) VALUES(?,?,?) "
                                  "ON CONFLICT DO NOTHING", (space, json.dumps(identity, sort_keys=True), now))
                    c.executemany(
                        "INSERT INTO embeddings(space, text_hash, cut, n_tokens, vec, crc, used) VALUES(?,?,?,?,?,?,?) "
                        "ON CONFLICT (space, text_hash, cut) DO UPDATE SET n_tokens=excluded.n_tokens, "
                        "vec=excluded.vec, crc=excluded.crc, used=excluded.used", recs)

            db.retry(tx)
            self._spaces.add(space)
            self._maybe_evict(len(recs), dim)
            return len(recs)
        except Exception as exc:  # noqa: BLE001
            self._failed("a write", exc)
            return 0

    def count(self) -> int:
        db = self.db()
        return int(db.retry(lambda: db.execute("SELECT COUNT(*) FROM embeddings")).fetchone()[0])

    def _maybe_evict(self, added: int, dim: int) -> None:
        limit = self.max_rows(dim or 384)
        if self._estimate is None:
            self._estimate = self.count()
        else:
            self._estimate += added
        if self._estimate <= limit:
            return
        n = self.count()
        if n > limit:
            self.evict(int(limit * 0.9))
            n = self.count()
        self._estimate = n

    def evict(self, keep: int) -> int:
        """Delete the least recently used rows until at most about ``keep`` remain; returns how many went."""
        db = self.db()
        n = self.count()
        if n <= keep:
            return 0
        row = db.retry(lambda: db.execute("SELECT used FROM embeddings ORDER BY used LIMIT 1 OFFSET ?",
                                          (n - keep - 1,))).fetchone()
        if row is None:
            return 0
        cur = db.retry(lambda: db.execute("DELETE FROM embeddings WHERE used <= ?", (float(row[0]),)))
        return int(cur.rowcount)

    def clear(self) -> int:
        db = self.db()
        return int(db.retry(lambda: db.execute("DELETE FROM embeddings")).rowcount)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


_STORE: EmbeddingStore | None = None
_STORE_LOCK = threading.Lock()


def use_store(target: str | os.PathLike[str] | None, max_mb: float = STORE_MB) -> EmbeddingStore | None:
    """Keep this process's embeddings in the database at ``target`` (the annotation cache's file or URL; None
    or ``max_mb`` 0: memory only). Process-wide: the service sets it to its annotation cache, ``molal annotate``
    to the cache it uses. Nothing is opened (or created) before the first embedding is looked up."""
    global _STORE
    with _STORE_LOCK:
        if target is None or max_mb <= 0:
            new = None
        elif _STORE is not None and _STORE.target == str(target):
            _STORE.max_mb = float(max_mb)
            return _STORE
        else:
            new = EmbeddingStore(target, max_mb)
        old, _STORE = _STORE, new
    if old is not None and old is not new:
        old.close()
    return new


def current_store() -> EmbeddingStore | None:
    return _STORE


# -- embedding -----------------------------------------------------------------------------------------------
#: (space, cut, text digest) -> (n_tokens, float32 vector): the process's embeddings (cut 0 = the whole text;
#: keyed by a digest: a key holding the text would let 200,000 texts of 32,000 characters take 6.4 GB more)
MEMORY: LRU[tuple[str, int, bytes], tuple[int, np.ndarray]] = LRU(MEMORY_TEXTS, max_size=MEMORY_BYTES,
                                                               sizeof=lambda v: int(v[1].nbytes) + 64)
#: what :func:`embed` did in this process: texts encoded, found in memory, found in the store
STATS = {"encoded": 0, "memory_hits": 0, "store_hits": 0, "tokens": 0}
_STATS_LOCK = threading.Lock()


def _count(**kw: int) -> None:
    with _STATS_LOCK:
        for k, v in kw.items():
            STATS[k] += v


def _remember(space: str, max_length: int, text: str, n_tok: int, vec: np.ndarray) -> int:
    """Keep a computed vector in memory under its cut; returns the cut (0: the whole text fitted)."""
    cut = 0 if n_tok < max_length else int(max_length)
    MEMORY.put((space, cut, text_digest(text)), (int(n_tok), vec))
    return cut


def _from_memory(space: str, max_length: int, text: str) -> np.ndarray | None:
    key = text_digest(text)
    hit = MEMORY.get((space, int(max_length), key))
    if hit is None:
        hit = MEMORY.get((space, 0, key))
        if hit is not None and hit[0] > max_length:
            hit = None
    return None if hit is None else hit[1]


def embed(
    texts: Sequence[str],
    model: str = "minilm",
    *,
    max_length: int = 128,
    device: str = "cpu",
    batch_size: int = 64,
    normalize: bool = True,
    deadline: float | None = None,
    progress: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, int]:
    """(n, d) float32 embeddings of ``texts`` (mean-pooled; unit norm with ``normalize``) and the number of
    tokens encoded for them (0 when every text was found). Each text is looked up in the process's memory,
    then in the store (:func:`use_store`), and encoded only when missing, sorted by length, in slices.

    ``deadline`` (``time.monotonic()``): :class:`EmbeddingDeadline` once it passes between slices (the slices
    done are kept). ``on_progress(done, total)`` after each slice; ``progress`` draws a bar."""
    max_length = int(max_length)
    enc = encoder(model, device)
    space = enc.space
    got: dict[str, np.ndarray] = {}  # this call's vectors, whatever the LRU evicts meanwhile
    uniq = list(dict.fromkeys(texts))
    for t in uniq:
        v = _from_memory(space, max_length, t)
        if v is not None:
            got[t] = v
    _count(memory_hits=len(got))
    miss = [t for t in uniq if t not in got]
    store = current_store()
    if miss and store is not None:
        found = store.get(space, miss, max_length, enc.dim)
        for t, (cut, n_tok, v) in found.items():
            MEMORY.put((space, cut, text_digest(t)), (n_tok, v))
            got[t] = v
        _count(store_hits=len(found))
        miss = [t for t in miss if t not in got]
    n_tok = 0
    if miss:
        n_tok = _compute(enc, miss, max_length, batch_size, got, store, deadline, progress, on_progress)
    d = enc.dim
    out = np.stack([got[t] for t in texts]) if len(texts) else np.zeros((0, d), np.float32)
    if normalize and len(out):
        out = out / np.clip(np.linalg.norm(out, axis=1, keepdims=True), 1e-12, None)
    return out.astype(np.float32, copy=False), n_tok


def _compute(enc: Encoder, texts: list[str], max_length: int, batch_size: int, got: dict[str, np.ndarray],
             store: EmbeddingStore | None, deadline: float | None, progress: bool,
             on_progress: Callable[[int, int], None] | None) -> int:
    from molal.progress import progress_bar

    clipped = enc.clip(texts, max_length)  # what the encoder reads, tokenised at a fraction of the cost
    lens = enc.token_counts(clipped, max_length)
    order = np.argsort(-lens, kind="stable")  # longest first (as sentence-transformers): the peak comes first
    step = max(1, int(batch_size)) * SLICE_BATCHES
    identity = {"model": enc.path if enc.path != _minilm() else "all-MiniLM-L6-v2", "pooling": "mean",
                "quantize": enc.quantize}
    done = 0
    with progress_bar("embed", len(texts), enabled=progress and len(texts) > step) as bar:
        for s in range(0, len(texts), step):
            if deadline is not None and time.monotonic() >= deadline:
                raise EmbeddingDeadline(f"deadline passed after {done} of {len(texts)} texts were embedded")
            idx = order[s : s + step]
            part = [texts[i] for i in idx]
            vecs = enc.encode([clipped[i] for i in idx], max_length, batch_size)
            rows = []
            for t, i, v in zip(part, idx, vecs, strict=True):
                got[t] = v
                rows.append((t, _remember(enc.space, max_length, t, int(lens[i]), v), int(lens[i]), v))
            if store is not None:
                store.put(enc.space, identity, rows)
            done += len(part)
            _count(encoded=len(part), tokens=int(lens[idx].sum()))
            bar.advance(len(part))
            if on_progress is not None:
                on_progress(done, len(texts))
    return int(lens.sum())


def _minilm() -> str:
    from molal.resources import resolve_model_path

    return resolve_model_path("minilm")


def dropout_embeddings(texts: Sequence[str], model: str = "minilm", *, seed: int, max_length: int = 128,
                       device: str = "cpu", batch_size: int = 64) -> tuple[np.ndarray, int]:
    """One stochastic pass with the encoder's dropout on (seeded; MC dropout): (n, d) unit vectors and the
    tokens processed. molal's own loop: sentence-transformers always encodes in eval mode. Never cached."""
    import torch

    enc = encoder(model, device)
    mdl = enc.dropout_model()
    out, n_tokens = [], 0
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(int(seed))
    try:
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                with enc.lock:
                    part = clip_texts(enc.tokenizer, texts[s : s + batch_size], int(max_length))
                    b = enc.tokenizer(part, padding=True, truncation=True, max_length=int(max_length),
                                      return_tensors="pt")
                b = {k: v.to(enc.device) for k, v in b.items()}
                hidden = mdl(**b).last_hidden_state
                mask = b["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
                n_tokens += int(b["attention_mask"].sum())
    finally:
        torch.random.set_rng_state(gen_state)
    if not out:
        return np.zeros((0, enc.dim), np.float32), 0
    return np.concatenate(out, axis=0), n_tokens


def stats() -> dict[str, int]:
    """A copy of :data:`STATS`."""
    with _STATS_LOCK:
        return dict(STATS)


__all__ = ["EmbeddingDeadline", "EmbeddingStore", "Encoder", "EncoderError", "MEMORY", "STATS", "clip_texts",
           "current_store", "dropout_embeddings", "embed", "encoder", "load_encoder", "model_fingerprint",
           "quantization", "resolve_device", "stats", "text_digest", "use_store"]
