"""Sentence embeddings with a local encoder (mean pooling, L2-normalised; ``"minilm"`` = the bundled
all-MiniLM-L6-v2, loaded offline), shared by the stages that use them: the embedding annotators
(:mod:`molal.annotators.embedding`) and MoLAM's text model (:mod:`molal.aggregation.text_model`). Encoders load
once per (folder, device); text embeddings are kept in a process-wide LRU (keyed by a digest of the text, so
it holds no texts), so a mixture's annotators and MoLAM embed each text once per process.

Long texts are cut before tokenising (:func:`clip_texts`): an encoder reads only its first ``max_length``
tokens, and tokenising a whole 32,000-character text to keep 128 of its tokens costs ~15x the time and memory.
The cut keeps those tokens exactly (checked with the tokenizer itself), so embeddings do not change.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from molal.lru import LRU


class EncoderError(RuntimeError):
    """The encoder cannot be loaded (missing folder, unreadable weights)."""


_MODELS: dict[tuple[str, str], Any] = {}
_MODELS_LOCK = threading.Lock()
#: text embeddings shared by the process: (model, max_length, text digest) -> unit vector (≈ 3 kB each for
#: MiniLM, ≈ 160 MB when full; keyed by a digest: a key holding the text would let 50,000 texts of 32,000
#: characters take 1.6 GB more)
TEXT_EMBEDDINGS: LRU[tuple[str, int, bytes], np.ndarray] = LRU(50_000)
#: texts longer than this many characters per token of ``max_length`` are cut before tokenising (a token is
#: rarely over 10 characters; the cut is checked, so this only decides how much is tokenised to check it)
CLIP_CHARS_PER_TOKEN = 12


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


def load_encoder(model: str = "minilm", device: str = "cpu") -> tuple[Any, Any]:
    """(tokenizer, model) of a sentence encoder from a local folder (``"minilm"`` = bundled), cached."""
    from molal.resources import offline_env, resolve_model_path

    path = resolve_model_path(model)
    key = (path, device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            offline_env()
            try:
                from transformers import AutoModel, AutoTokenizer

                tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
                mdl = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
            except (OSError, ValueError) as exc:
                raise EncoderError(f"cannot load the encoder {model!r} from {path}: {exc}") from exc
            _MODELS[key] = (tok, mdl)
        return _MODELS[key]


def model_fingerprint(model: str) -> dict[str, Any]:
    """Install-independent identity of an encoder: its name and the sizes of its weight/config files (so a
    cache survives moving the venv, but not swapping the weights)."""
    from pathlib import Path

    from molal.resources import resolve_model_path

    path = Path(resolve_model_path(model))
    files = {}
    if path.is_dir():
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + [path / "config.json", path / "tokenizer.json"]:
            if f.exists():
                files[f.name] = f.stat().st_size
    name = "all-MiniLM-L6-v2" if str(path) == resolve_model_path("minilm") else model
    return {"name": name, "files": files}


def embed_texts(
    texts: Sequence[str],
    model: str = "minilm",
    device: str = "cpu",
    batch_size: int = 64,
    max_length: int = 128,
    dropout_seed: int | None = None,
) -> tuple[np.ndarray, int]:
    """Mean-pooled, L2-normalised embeddings (n, d) and the number of tokens processed.

    With ``dropout_seed`` the encoder runs with dropout on (one stochastic pass, seeded)."""
    import torch

    tok, mdl = load_encoder(model, device)
    out, n_tokens = [], 0
    gen_state = None
    if dropout_seed is not None:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(dropout_seed)
        mdl.train()
    try:
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                part = clip_texts(tok, texts[s : s + batch_size], max_length)
                enc = tok(part, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                enc = {k: v.to(device) for k, v in enc.items()}
                hidden = mdl(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out.append(pooled.float().cpu().numpy())
                n_tokens += int(enc["attention_mask"].sum())
    finally:
        if dropout_seed is not None:
            mdl.eval()
            torch.random.set_rng_state(gen_state)
    return np.concatenate(out, axis=0).astype(np.float64), n_tokens


def embed_texts_shared(
    texts: Sequence[str], model: str = "minilm", device: str = "cpu", batch_size: int = 64, max_length: int = 128
) -> tuple[np.ndarray, int]:
    """:func:`embed_texts` through the process-wide LRU cache keyed by (model, max_length, text): the
    annotators of one mixture, and MoLAM's text model, embed each text once per process. Returns the (n, d)
    embeddings and the number of tokens actually processed (0 when everything was cached)."""
    device = resolve_device(device)
    keys = [(model, int(max_length), text_digest(t)) for t in texts]
    found = {i: v for i, k in enumerate(keys) if (v := TEXT_EMBEDDINGS.get(k)) is not None}
    todo = [i for i in range(len(texts)) if i not in found]
    n_tok = 0
    if todo:
        uniq = list(dict.fromkeys(texts[i] for i in todo))
        new, n_tok = embed_texts(uniq, model, device, batch_size, int(max_length))
        by_text = dict(zip(uniq, new, strict=True))
        for t, v in by_text.items():
            TEXT_EMBEDDINGS.put((model, int(max_length), text_digest(t)), v)
        for i in todo:
            found[i] = by_text[texts[i]]
    if not found:
        return np.zeros((0, 0)), 0
    return np.stack([found[i] for i in range(len(texts))]), n_tok


__all__ = ["EncoderError", "TEXT_EMBEDDINGS", "clip_texts", "embed_texts", "embed_texts_shared", "load_encoder", "model_fingerprint",
           "resolve_device", "text_digest"]
