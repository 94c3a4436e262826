"""The student: a small text classifier (HF encoder + mean pooling + linear head) fine-tuned on MoLAM labels
with the paper's noise-robust loss (:mod:`molal.loss`).

* Offline default encoder: the bundled all-MiniLM-L6-v2 (``encoder="minilm"``); any HF model folder or
  name whose weights are available locally works (the paper uses distilbert-base-uncased / distilroberta-base).
* Every :meth:`Student.fit` starts again from the *same start weights* (the pretrained encoder and a head
  initialised from ``seed``), as in the paper's per-round re-training.
* AdamW (lr 5e-5, weight decay 0.01), linear warm-up over the first 10% of steps then linear decay,
  dynamic padding (pad per batch), inference sorted by length.
* **Best epoch without gold labels beyond the seeds**: when ``val_texts``/``val_labels`` are given (the
  seed / human-labelled items — never the test set, never gold labels of MoLAM-labelled items), the
  epoch with the highest accuracy on them (ties: lowest cross-entropy) is kept; otherwise the last epoch.
  In the simulation those items are also training items, so this mostly guards against a collapsed epoch.
* ``min_steps`` (default 0 = off): train for more epochs than ``epochs`` when a small training set would
  otherwise get fewer than ``min_steps`` optimiser steps (e.g. the 50 seeds of the cold start).
* ``max_steps`` (default 0 = off): train for fewer epochs than ``epochs`` when a big training set would
  otherwise take more than ``max_steps`` optimiser steps (at least one whole epoch; the fewest whole epochs
  that reach ``max_steps``): 30 epochs of a 100k-task project are 187,500 steps of 16.
* Deterministic for a given ``seed`` on one device (CPU by default when no CUDA; ``device="auto"`` picks
  CUDA when present).

``freeze_encoder=True`` is a fast preset for CPU-bound simulations: the encoder stays at its start weights
(its embeddings come from :func:`molal.embeddings.embed`: computed once per text, shared with the scorers
and kept in the embedding store) and only the linear head is trained, with the same loss/optimiser/schedule;
``lr`` left unset is then 1e-3 (:data:`HEAD_LR`; 5e-5, :data:`FINETUNE_LR`, when fine-tuning), and it wants more epochs, e.g. 30 (≈1 s for 250 texts): a head trained 1 epoch at 5e-5 stays
near uniform (trained on 250 TREC questions, tested on 50: 28% accuracy, normalised entropy 0.997, against
70% and 0.73 at 1e-3 × 30 epochs). It is a weaker student
than full fine-tuning; results obtained with it are labelled as such.

Extra outputs for the query strategies (:mod:`molal.query`): :meth:`Student.embed` (pooled encoder
embeddings = the head's input), :meth:`Student.infer` (probs + embeddings in one pass),
:meth:`Student.mc_dropout_probs` (BEMPS) and :meth:`Student.perturbed_probs` (NoiseStability).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from molal.io import DIR_MODE, atomic_write_json
from molal.loss import lambda_t, noise_robust_loss
from molal.progress import progress_bar

FORMAT = "molal.Student"
FORMAT_VERSION = 1
FINETUNE_LR = 5e-5  # default lr when the encoder is fine-tuned
HEAD_LR = 1e-3  # default lr when only the head is trained (freeze_encoder)


class StudentError(ValueError):
    """Bad input to the student (shapes, labels, texts) or an unusable saved student."""


def _torch():
    import torch

    return torch


def resolve_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error."""
    torch = _torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StudentError("device 'cuda' requested but no CUDA device is available")
    if device != "cpu" and not device.startswith("cuda") and device != "mps":
        raise StudentError(f"unknown device {device!r} (use auto, cpu or cuda)")
    return device


def _build_module(encoder_model: Any, n_classes: int, dropout: float, seed: int):
    torch = _torch()
    nn = torch.nn

    class _Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder_model
            hidden = int(encoder_model.config.hidden_size)
            self.dropout = nn.Dropout(dropout)
            self.head = nn.Linear(hidden, n_classes)
            g = torch.Generator().manual_seed(int(seed))
            with torch.no_grad():
                self.head.weight.normal_(0.0, 0.02, generator=g)
                self.head.bias.zero_()

        def pooled(self, input_ids, attention_mask, token_type_ids=None):
            kw = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kw["token_type_ids"] = token_type_ids
            hidden = self.encoder(**kw).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            emb = self.pooled(input_ids, attention_mask, token_type_ids)
            return self.head(self.dropout(emb)), emb

    return _Classifier()


def _length_bucketed_batches(n: int, batch_size: int, gen, lengths: list[int] | None, bucket: int = 50) -> list[list[int]]:
    """Random batches with little padding: shuffle, sort by length inside windows of ``bucket`` batches,
    cut into batches, shuffle the batch order (all draws from ``gen``, so deterministic)."""
    torch = _torch()
    perm = torch.randperm(n, generator=gen).tolist()
    if lengths is not None:
        w = batch_size * bucket
        perm = [i for s in range(0, n, w) for i in sorted(perm[s : s + w], key=lambda i: lengths[i])]
    batches = [perm[s : s + batch_size] for s in range(0, n, batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


def epoch_count(epochs: int, steps_per_epoch: int, min_steps: int = 0, max_steps: int = 0) -> int:
    """Epochs to train: ``epochs``, raised until ``min_steps`` optimiser steps are reached (small training
    sets), else lowered to the fewest whole epochs that reach ``max_steps`` (big ones; at least 1); 0 = off."""
    if min_steps and epochs * steps_per_epoch < min_steps:
        return math.ceil(min_steps / steps_per_epoch)
    if max_steps and epochs * steps_per_epoch > max_steps:
        return max(1, math.ceil(max_steps / steps_per_epoch))
    return epochs


class Student:
    """Text classifier over ``class_names`` (see the module docstring for the training recipe)."""

    def __init__(
        self,
        class_names: Sequence[str],
        encoder: str = "minilm",
        max_length: int = 128,
        epochs: int = 3,
        batch_size: int = 16,
        lr: float | None = None,
        warmup: float = 0.1,
        device: str = "auto",
        seed: int = 0,
        weight_decay: float = 0.01,
        dropout: float = 0.1,
        lambda_base: float = 0.4,
        lambda_step: float = 0.06,
        infer_batch_size: int = 128,
        freeze_encoder: bool = False,
        min_steps: int = 0,
        max_steps: int = 0,
    ) -> None:
        class_names = [str(c) for c in class_names]
        if len(class_names) < 2:
            raise StudentError(f"need at least 2 classes, got {class_names}")
        if len(set(class_names)) != len(class_names):
            raise StudentError(f"duplicate class names: {class_names}")
        for name, val, lo in (("max_length", max_length, 8), ("epochs", epochs, 1), ("batch_size", batch_size, 1)):
            if int(val) < lo:
                raise StudentError(f"{name} must be >= {lo}, got {val}")
        if not 0 <= warmup < 1:
            raise StudentError(f"warmup must be a fraction in [0, 1), got {warmup}")
        if lr is None:  # the preset for the mode: fine-tuning a transformer vs. training a linear head
            lr = HEAD_LR if freeze_encoder else FINETUNE_LR
        if lr <= 0:
            raise StudentError(f"lr must be > 0, got {lr}")
        self.class_names = class_names
        self.encoder = encoder
        self.max_length = int(max_length)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.warmup = float(warmup)
        self.device_name = device
        self.seed = int(seed)
        self.weight_decay = float(weight_decay)
        self.dropout = float(dropout)
        self.lambda_base = float(lambda_base)
        self.lambda_step = float(lambda_step)
        self.infer_batch_size = int(infer_batch_size)
        self.freeze_encoder = bool(freeze_encoder)
        self.min_steps = int(min_steps)
        self.max_steps = int(max_steps)
        if self.min_steps < 0 or self.max_steps < 0:
            raise StudentError(f"min_steps and max_steps must be >= 0, got {min_steps}, {max_steps}")
        self.metadata: dict[str, Any] = {}
        self._device: str | None = None
        self._tokenizer = None
        self._start_encoder = None  # pristine pretrained encoder on CPU (the per-round start weights)
        self._model = None  # fitted (or loaded) classifier
        self._fitted = False

    # -- setup ---------------------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def device(self) -> str:
        if self._device is None:
            self._device = resolve_device(self.device_name)
        return self._device

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    def config(self) -> dict[str, Any]:
        return {
            "class_names": self.class_names,
            "encoder": self.encoder,
            "max_length": self.max_length,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "warmup": self.warmup,
            "device": self.device_name,
            "seed": self.seed,
            "weight_decay": self.weight_decay,
            "dropout": self.dropout,
            "lambda_base": self.lambda_base,
            "lambda_step": self.lambda_step,
            "infer_batch_size": self.infer_batch_size,
            "freeze_encoder": self.freeze_encoder,
            "min_steps": self.min_steps,
            "max_steps": self.max_steps,
        }

    def _encoder_path(self) -> str:
        from molal.resources import offline_env, resolve_model_path

        offline_env()
        return resolve_model_path(self.encoder)

    def _load_start(self) -> None:
        if self._start_encoder is not None:
            return
        from transformers import AutoModel, AutoTokenizer

        path = self._encoder_path()
        try:
            if self._tokenizer is None:
                self._tokenizer = AutoTokenizer.from_pretrained(path)
            self._start_encoder = AutoModel.from_pretrained(path)
        except OSError as exc:
            raise StudentError(
                f"cannot load encoder {self.encoder!r} from {path!r} offline ({exc}); "
                "pass a local model folder or 'minilm'"
            ) from exc
        self._start_encoder.eval()

    def _fresh_model(self):
        torch = _torch()
        self._load_start()
        torch.manual_seed(self.seed)
        enc = self._start_encoder if self.freeze_encoder else copy.deepcopy(self._start_encoder)
        model = _build_module(enc, self.n_classes, self.dropout, self.seed).to(self.device)
        if self.freeze_encoder:
            for p in model.encoder.parameters():
                p.requires_grad_(False)
        return model

    def _frozen_embeddings(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Embeddings of the frozen start encoder (mean-pooled, not normalised): :func:`molal.embeddings.embed`,
        so each text is embedded once per encoder and max length, shared with the scorers and MoLAM's text model
        and kept across processes in the embedding store."""
        from molal.embeddings import EncoderError, embed

        try:
            emb, _ = embed(texts, self.encoder, max_length=self.max_length, device=self.device,
                           batch_size=self.infer_batch_size, normalize=False, progress=progress)
        except EncoderError as exc:
            raise StudentError(f"cannot load encoder {self.encoder!r} ({exc})") from exc
        return emb

    def _tokenize(self, texts: Sequence[str]) -> list[dict[str, list[int]]]:
        from molal.embeddings import clip_texts

        self._load_tokenizer()
        texts = clip_texts(self._tokenizer, texts, self.max_length)  # same tokens, a fraction of the work
        enc = self._tokenizer(texts, truncation=True, max_length=self.max_length, padding=False)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        return [{k: enc[k][i] for k in keys} for i in range(len(texts))]

    def _load_tokenizer(self) -> None:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            path = self._encoder_path()
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(path)
            except OSError as exc:
                raise StudentError(f"cannot load the tokenizer of {self.encoder!r} from {path!r} ({exc})") from exc

    def _collate(self, feats: list[dict[str, list[int]]]) -> dict[str, Any]:
        batch = self._tokenizer.pad(feats, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    @staticmethod
    def _check_texts(texts: Sequence[str], what: str = "texts") -> list[str]:
        if isinstance(texts, str):
            raise StudentError(f"{what} must be a list of strings, not a single string")
        out = list(texts)
        for i, t in enumerate(out):
            if not isinstance(t, str):
                raise StudentError(f"{what}[{i}] must be a string, got {type(t).__name__}")
        return out

    # -- training ------------------------------------------------------------------------------------
    def fit(
        self,
        texts: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        weights: Sequence[float] | np.ndarray | None = None,
        negatives: np.ndarray | None = None,
        round_t: int = 0,
        val_texts: Sequence[str] | None = None,
        val_labels: Sequence[int] | np.ndarray | None = None,
        progress: bool = True,
    ) -> Student:
        """Train from the start weights on ``texts``/``labels`` (class indices) with the noise-robust loss.

        ``weights`` (n,) are the CE weights w_i (:func:`molal.loss.discrepancy_weights`), ``negatives``
        (n, K) bool the negative label sets N_i (all False for human-labelled items), ``round_t`` the AL
        round (λ_t = lambda_base + lambda_step·t). ``val_texts``/``val_labels``: seed/human-labelled items
        used to pick the best epoch (see the module docstring).
        """
        torch = _torch()
        texts = self._check_texts(texts)
        n = len(texts)
        if n == 0:
            raise StudentError("no training texts")
        y = np.asarray(labels, dtype=np.int64)
        if y.shape != (n,):
            raise StudentError(f"labels must have shape ({n},), got {y.shape}")
        if (y < 0).any() or (y >= self.n_classes).any():
            raise StudentError(f"labels must be class indices in [0, {self.n_classes}); got {sorted(set(y.tolist()))}")
        w = np.ones(n, np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
        if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any():
            raise StudentError(f"weights must be ({n},) finite non-negative numbers")
        neg = None
        if negatives is not None:
            neg = np.asarray(negatives, dtype=bool)
            if neg.shape != (n, self.n_classes):
                raise StudentError(f"negatives must have shape ({n}, {self.n_classes}), got {neg.shape}")
        if (val_texts is None) != (val_labels is None):
            raise StudentError("give both val_texts and val_labels, or neither")
        val = None
        if val_texts is not None:
            vt = self._check_texts(val_texts, "val_texts")
            vy = np.asarray(val_labels, dtype=np.int64)
            if vy.shape != (len(vt),) or (vy < 0).any() or (vy >= self.n_classes).any():
                raise StudentError("val_labels must be class indices, one per val text")
            if len(vt):
                val = (vt, vy)
        lam = lambda_t(round_t, self.lambda_base, self.lambda_step)

        t0 = time.perf_counter()
        model = self._fresh_model()
        if self.freeze_encoder:
            emb_train = torch.from_numpy(self._frozen_embeddings(texts, progress)).to(self.device)
        else:
            feats = self._tokenize(texts)
        steps_per_epoch = math.ceil(n / self.batch_size)
        epochs = epoch_count(self.epochs, steps_per_epoch, self.min_steps, self.max_steps)
        total = steps_per_epoch * epochs
        from transformers import get_linear_schedule_with_warmup

        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if (p.ndim < 2 or "LayerNorm" in name or "bias" in name) else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
        )
        sched = get_linear_schedule_with_warmup(opt, int(round(self.warmup * total)), total)
        gen = torch.Generator().manual_seed(self.seed)
        y_t = torch.from_numpy(y)
        w_t = torch.from_numpy(w)
        neg_t = torch.from_numpy(neg) if neg is not None else None
        history: list[dict[str, float]] = []
        best: tuple[float, float, int] | None = None
        best_state = None
        with progress_bar("student fit", total, enabled=progress) as bar:
            for epoch in range(epochs):
                model.train()
                lengths = None if self.freeze_encoder else [len(f["input_ids"]) for f in feats]
                batches = _length_bucketed_batches(n, self.batch_size, gen, lengths)
                loss_sum = 0.0
                for idx in batches:
                    if self.freeze_encoder:
                        logits = model.head(model.dropout(emb_train[idx]))
                    else:
                        logits, _ = model(**self._collate([feats[i] for i in idx]))
                    loss = noise_robust_loss(
                        logits,
                        y_t[idx].to(self.device),
                        w_t[idx].to(self.device),
                        None if neg_t is None else neg_t[idx].to(self.device),
                        lam,
                    )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    sched.step()
                    loss_sum += float(loss.detach()) * len(idx)
                    bar.advance()
                rec = {"epoch": epoch + 1, "train_loss": loss_sum / n}
                if val is not None:
                    p = self._predict(model, val[0])
                    acc = float((p.argmax(1) == val[1]).mean())
                    ce = float(-np.log(np.clip(p[np.arange(len(val[1])), val[1]], 1e-12, None)).mean())
                    rec.update(val_acc=acc, val_ce=ce)
                    key = (acc, -ce, epoch)
                    if best is None or key[:2] > best[:2]:
                        best = key
                        best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                history.append(rec)
        best_epoch = epochs
        if best_state is not None and best is not None:
            best_epoch = best[2] + 1
            if best_epoch != epochs:
                model.load_state_dict(best_state)
        model.eval()
        self._model = model
        self._fitted = True
        self.metadata = {
            "n_train": n,
            "round_t": int(round_t),
            "lambda": lam,
            "n_with_negatives": int(neg.any(1).sum()) if neg is not None else 0,
            "n_downweighted": int((w < 1).sum()),
            "epochs": epochs,
            "steps": total,
            "best_epoch": best_epoch,
            "best_epoch_selected_on": "val (seed/human-labelled items)" if val is not None else "last epoch",
            "n_val": 0 if val is None else len(val[0]),
            "history": history,
            "seconds": round(time.perf_counter() - t0, 3),
            "device": self.device,
        }
        return self

    # -- inference -----------------------------------------------------------------------------------
    def _require_fitted(self):
        if not self._fitted or self._model is None:
            raise StudentError("the student is not fitted: call fit() (or Student.load()) first")
        return self._model

    def _forward_all(self, model, texts: Sequence[str], train_mode: bool = False, seed: int | None = None):
        """(logits, embeddings) for all texts, batched by length; returns numpy in input order."""
        torch = _torch()
        texts = self._check_texts(texts)
        n = len(texts)
        hidden = int(model.encoder.config.hidden_size)
        logits_out = np.zeros((n, self.n_classes), np.float32)
        emb_out = np.zeros((n, hidden), np.float32)
        if n == 0:
            return logits_out, emb_out
        if self.freeze_encoder:
            emb = self._frozen_embeddings(texts)
            model.train(train_mode)
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
                e = torch.from_numpy(emb).to(self.device)
                logits_out[:] = model.head(model.dropout(e)).float().cpu().numpy()
            model.eval()
            return logits_out, emb
        feats = self._tokenize(texts)
        order = np.argsort([len(f["input_ids"]) for f in feats], kind="stable")
        model.train(train_mode)
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            for s in range(0, n, self.infer_batch_size):
                idx = order[s : s + self.infer_batch_size]
                logits, emb = model(**self._collate([feats[i] for i in idx]))
                logits_out[idx] = logits.float().cpu().numpy()
                emb_out[idx] = emb.float().cpu().numpy()
        model.eval()
        return logits_out, emb_out

    def _predict(self, model, texts: Sequence[str]) -> np.ndarray:
        logits, _ = self._forward_all(model, texts)
        return _softmax(logits)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """(n, K) class probabilities."""
        return self._predict(self._require_fitted(), texts)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """(n,) predicted class indices."""
        return self.predict_proba(texts).argmax(1)

    def infer(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(probs (n, K), pooled embeddings (n, d)) in one forward pass."""
        logits, emb = self._forward_all(self._require_fitted(), texts)
        return _softmax(logits), emb

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) mean-pooled encoder embeddings (the head's input). Before fit: the start encoder's."""
        if self._fitted and self._model is not None:
            return self._forward_all(self._model, texts)[1]
        return self._forward_all(self._fresh_model(), texts)[1]

    def mc_dropout_probs(self, texts: Sequence[str], n: int = 10) -> np.ndarray:
        """(n, N, K) probabilities from ``n`` forward passes with dropout active (MC dropout)."""
        if n < 1:
            raise StudentError("n must be >= 1")
        model = self._require_fitted()
        out = [_softmax(self._forward_all(model, texts, train_mode=True, seed=self.seed + 1000 + i)[0]) for i in range(n)]
        return np.stack(out)

    def perturbed_probs(self, texts: Sequence[str], n: int = 5, scale: float = 1e-3,
                        weights_only: bool = True) -> np.ndarray:
        """(n, N, K) probabilities of ``n`` copies of the model whose every weight tensor W got Gaussian
        noise of norm ``scale·‖W‖`` (NoiseStability, Li et al. 2024). ``weights_only``: only parameters named
        ``*.weight`` (as the paper's code: biases are left alone); else every parameter."""
        torch = _torch()
        if n < 1 or scale <= 0:
            raise StudentError("need n >= 1 and scale > 0")
        model = self._require_fitted()
        original = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out = []
        try:
            for i in range(n):
                g = torch.Generator().manual_seed(self.seed + 2000 + i)
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        if self.freeze_encoder and not p.requires_grad:
                            continue  # frozen encoder: only the trained head is perturbed
                        if weights_only and not name.endswith("weight"):
                            continue
                        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.device, p.dtype)
                        nn_ = noise.norm()
                        if nn_ > 0:
                            p.add_(noise * (scale * p.norm() / nn_))
                out.append(_softmax(self._forward_all(model, texts)[0]))
                model.load_state_dict(original)
        finally:
            model.load_state_dict(original)
        return np.stack(out)

    # -- persistence ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save to folder ``path`` atomically (written to a temp folder, then renamed into place):
        ``encoder/`` (save_pretrained, safetensors + tokenizer), ``head.safetensors``, ``student.json``."""
        torch = _torch()
        from safetensors.torch import save_file

        model = self._require_fitted()
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            os.chmod(tmp, DIR_MODE)
            model.encoder.save_pretrained(tmp / "encoder", safe_serialization=True)
            self._tokenizer.save_pretrained(tmp / "encoder")
            head = {k: v.detach().to("cpu").contiguous() for k, v in model.head.state_dict().items()}
            save_file(head, str(tmp / "head.safetensors"))
            from molal import __version__

            atomic_write_json(
                tmp / "student.json",
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "molal_version": __version__,
                    "torch_version": torch.__version__,
                    "config": self.config(),
                    "training": self.metadata,
                },
            )
            backup = None
            if target.exists():
                backup = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
                os.replace(target, backup)
            os.replace(tmp, target)
            if backup is not None:
                shutil.rmtree(backup, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | None = None) -> Student:
        """Load a student saved by :meth:`save` (a later ``fit`` restarts from the original encoder)."""
        from safetensors.torch import load_file
        from transformers import AutoModel, AutoTokenizer

        p = Path(path)
        meta_path = p / "student.json"
        if not meta_path.exists():
            raise StudentError(f"{p}: not a saved student (student.json missing)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise StudentError(f"{p}: not a saved student (format {meta.get('format')!r})")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise StudentError(f"{p}: student format version {meta['format_version']} is newer than this molal")
        cfg = dict(meta["config"])
        if device is not None:
            cfg["device"] = device
        st = cls(**cfg)
        try:
            st._tokenizer = AutoTokenizer.from_pretrained(p / "encoder")
            enc = AutoModel.from_pretrained(p / "encoder")
            head = load_file(str(p / "head.safetensors"))
        except OSError as exc:
            raise StudentError(f"{p}: saved student is incomplete or corrupted ({exc})") from exc
        model = _build_module(enc, st.n_classes, st.dropout, st.seed)
        model.head.load_state_dict(head)
        model.to(st.device).eval()
        st._model = model
        st._fitted = True
        st.metadata = meta.get("training", {})
        return st


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
