"""MoLAM: the aggregator of a mixture of LLMs, chosen among candidate models by cross-validation on the seeds."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from molal.aggregation.base import Aggregator, MoLAMError
from molal.aggregation.baselines import BestSingleLLM
from molal.aggregation.calibration import apply_temperature, fit_temperature, log_loss
from molal.aggregation.models import (
    AverageCandidate,
    BestSingleCandidate,
    Candidate,
    CandidateData,
    DawidSkeneCandidate,
    LogisticCandidate,
    XGBCandidate,
    candidate_from_state,
)
from molal.aggregation.signals import (
    ds_em,
    ds_observations,
    ds_posterior,
    general_features,
    normalize_rows,
    standardize,
)
from molal.aggregation.text_model import TextModel
from molal.data import LLMOutputs

#: the chi-square(1) 95% quantile: temperature scaling is applied only when it improves the seeds'
#: out-of-fold likelihood by more than chance would (a likelihood-ratio test)
CALIBRATION_LR_CRITICAL = 3.841

#: the text model's parameters as MoLAM names them (``text_<name>``), with the TextModel argument each sets
_TEXT_PARAMS = {"text_weight": "weight", "text_c": "c", "text_folds": "folds", "text_seed_weight": "seed_weight",
                "text_rounds": "rounds", "text_ngrams": "ngrams", "text_max_length": "max_length",
                "text_device": "device"}


def _stratified_folds(labels: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold id per seed, classes spread evenly across folds."""
    fold = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        members = rng.permutation(np.where(labels == c)[0])
        fold[members] = (np.arange(len(members)) + offset) % n_folds
        offset += len(members)
    return fold


class MoLAM(Aggregator):
    """Mixture-of-LLMs aggregator chosen by cross-validation on the seeds.

    Candidates (:mod:`molal.aggregation.models`): logistic regression on general features (per-LLM
    log-probabilities and vote shares, their means, and the pool's Dawid–Skene posterior) at several
    regularisation strengths, XGBoost on the same features, the Dawid–Skene posterior itself, the best single
    LLM, and their average. The candidate with the best repeated stratified out-of-fold accuracy on the seeds
    is the reference; by the one-standard-error rule the steadiest candidate within one standard error of it
    is chosen (the average, then Dawid–Skene, then the best single LLM, then the rest by accuracy). Safety
    net: the choice is never more than one standard error below the best single LLM's out-of-fold accuracy.
    Classes absent from the seeds keep the probability mass the Dawid–Skene posterior gives them.

    Args:
        candidates: names among ``lr_C`` (C in ``lr_cs``), ``xgb``, ``ds``, ``best_single``, ``avg``
            (mean of the lr_*, xgb, ds and best_single models); None = all.
        lr_cs: regularisation strengths tried for the logistic regression.
        n_folds, n_repeats: the cross-validation on the seeds.
        xgb_params: learning_rate / max_depth / n_estimators of the XGBoost candidate.
        nthread: threads for XGBoost and the BLAS pools during fit (1 is fastest for ~50 seeds).
        seed: random seed of the folds and XGBoost.
        progress: show a progress bar during model selection.
        text_features: None (the LLM outputs only) or a sentence encoder (``"minilm"`` = the bundled
            all-MiniLM-L6-v2, or a local model folder): correct the chosen model with the texts themselves
            (:mod:`molal.aggregation.text_model`; needs ``outputs.texts``).
        text_weight, text_c, text_folds, text_seed_weight, text_rounds, text_ngrams, text_max_length,
            text_device: the text model's exponent in the product, inverse regularisation, cross-fitting
            folds, weight of a seed row, self-training rounds, hashed n-gram features (0 = embeddings only),
            encoder truncation and torch device.
        calibration: ``"temperature"`` (default) or None: temperature scaling of the served distribution
            (:mod:`molal.aggregation.calibration`), fitted on the chosen model's out-of-fold predictions on the
            seeds (the cross-validation's, times the cross-fitted text model's where there is one), and applied
            only when it improves their log loss significantly (likelihood-ratio test, 5%; 50 seeds make a
            fitted temperature noisy). Accuracy is unchanged, only the confidence moves.
            ``metadata["calibration"]`` reports the fitted temperature, whether it was applied, and the seeds'
            out-of-fold log loss and ECE before and after.
        drop_members: True (default): members the seeds flag (:func:`molal.aggregation.members.check_members`:
            at or below chance, or collapsed onto one class) are a choice like the candidates are: the model
            selection runs with and without them (the same folds), and they are dropped unless keeping them
            wins out-of-fold on the seeds. ``metadata["members"]`` says what was flagged, measured and kept.

    Fitted: ``choice_`` (the chosen candidate's name), ``model_`` (the candidate), ``ds_prior_``/``ds_logpi_``
    (the pool's Dawid–Skene model), ``mu_``/``sd_`` (feature standardisation), ``text_model_`` (or None),
    ``temperature_`` (1.0 = none).
    """

    kind = "molam"

    def __init__(
        self,
        candidates: Sequence[str] | None = None,
        lr_cs: Sequence[float] = (0.03, 0.1, 0.3, 1.0),
        n_folds: int = 5,
        n_repeats: int = 3,
        xgb_params: dict[str, Any] | None = None,
        nthread: int = 1,
        seed: int = 0,
        progress: bool = False,
        text_features: str | None = None,
        text_weight: float = 1.0,
        text_c: float = 3.0,
        text_folds: int = 5,
        text_seed_weight: float = 10.0,
        text_rounds: int = 3,
        text_ngrams: int = 4096,
        text_max_length: int = 64,
        text_device: str = "cpu",
        calibration: str | None = "temperature",
        drop_members: bool = True,
    ) -> None:
        super().__init__()
        self.candidates = candidates
        self.lr_cs = lr_cs
        self.n_folds = n_folds
        self.n_repeats = n_repeats
        self.xgb_params = xgb_params
        self.nthread = nthread
        self.seed = seed
        self.progress = progress
        self.text_features = text_features
        self.text_weight = text_weight
        self.text_c = text_c
        self.text_folds = text_folds
        self.text_seed_weight = text_seed_weight
        self.text_rounds = text_rounds
        self.text_ngrams = text_ngrams
        self.text_max_length = text_max_length
        self.text_device = text_device
        self.calibration = calibration
        self.drop_members = drop_members
        #: the members the fitted model uses (None: all of them)
        self.members_: list[str] | None = None
        self.choice_: str | None = None
        self.model_: Candidate | None = None
        self.text_model_: TextModel | None = None
        self.temperature_ = 1.0
        self._oof: tuple[np.ndarray, np.ndarray] | None = None

    # -- parameters --------------------------------------------------------------------------------
    def _validate(self) -> None:
        tf = self.text_features
        if tf is not None and (not isinstance(tf, str) or not tf.strip()):
            raise MoLAMError(f"text_features must be None or an encoder name/folder (e.g. 'minilm'), got {tf!r}")
        for name, ok, rule in (("text_weight", float(self.text_weight) >= 0, ">= 0"),
                               ("text_c", float(self.text_c) > 0, "> 0"),
                               ("text_folds", int(self.text_folds) >= 2, ">= 2"),
                               ("text_seed_weight", float(self.text_seed_weight) > 0, "> 0"),
                               ("text_rounds", int(self.text_rounds) >= 1, ">= 1"),
                               ("text_ngrams", int(self.text_ngrams) >= 0, ">= 0 (0 = embeddings only)"),
                               ("text_max_length", int(self.text_max_length) >= 8, ">= 8"),
                               ("n_folds", int(self.n_folds) >= 2, ">= 2"),
                               ("n_repeats", int(self.n_repeats) >= 1, ">= 1")):
            if not ok:
                raise MoLAMError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        if not all(float(c) > 0 for c in self.lr_cs):
            raise MoLAMError(f"lr_cs must be positive, got {list(self.lr_cs)}")
        if self.calibration not in (None, "temperature"):
            raise MoLAMError(f"calibration must be None or 'temperature', got {self.calibration!r}")

    def _saved_params(self) -> dict[str, Any]:
        # the text parameters only with a text model: files written without the option stay as they were
        p = {k: v for k, v in self.get_params().items() if self.text_features is not None or not k.startswith("text_")}
        if self.calibration is None:  # files written without calibration stay as they were
            p.pop("calibration")
        if self.drop_members:  # likewise: the default is not written
            p.pop("drop_members")
        p["candidates"] = list(self.candidates) if self.candidates is not None else None
        p["lr_cs"] = [float(c) for c in self.lr_cs]
        p["xgb_params"] = self._xgb_params()
        return p

    def _xgb_params(self) -> dict[str, Any]:
        return dict(self.xgb_params or {"learning_rate": 0.05, "max_depth": 3, "n_estimators": 200})

    def _text_model(self) -> TextModel:
        return TextModel(encoder=self.text_features or "minilm", seed=int(self.seed),
                         **{arg: getattr(self, name) for name, arg in _TEXT_PARAMS.items()})

    # -- candidates --------------------------------------------------------------------------------
    def candidate_names(self) -> list[str]:
        """The candidates this MoLAM chooses among (``candidates`` checked against the known names)."""
        names = [f"lr_{float(c):g}" for c in self.lr_cs] + ["xgb", "ds", "best_single", "avg"]
        if self.candidates is not None:
            unknown = [c for c in self.candidates if c not in names]
            if unknown:
                raise MoLAMError(f"unknown MoLAM candidates {unknown}; choose from {names}")
            names = [c for c in names if c in self.candidates]
        return names

    def _avg_members(self, names: list[str]) -> list[str]:
        """Members of the ``avg`` candidate: the logistic regressions, XGBoost, Dawid–Skene and the best
        single LLM (their mean is steadier than any one of them chosen on 50 noisy seeds)."""
        base = [f"lr_{float(c):g}" for c in self.lr_cs] + ["xgb", "ds", "best_single"]
        return [n for n in base if n in names] or base

    def _candidate(self, name: str, members: list[str] | None = None) -> Candidate:
        """A fresh, unfitted candidate for ``name``."""
        if name == "avg":
            return AverageCandidate([self._candidate(m) for m in (members or self._avg_members([]))])
        if name.startswith("lr_"):
            return LogisticCandidate(float(name[3:]))
        if name == "xgb":
            return XGBCandidate(self._xgb_params(), nthread=int(self.nthread), seed=int(self.seed))
        if name == "ds":
            return DawidSkeneCandidate()
        if name == "best_single":
            return BestSingleCandidate()
        raise MoLAMError(f"unknown candidate {name}")

    # -- fit / predict -----------------------------------------------------------------------------
    def _data(self, outputs: LLMOutputs, with_features: bool = True) -> CandidateData:
        ds_post = ds_posterior(ds_observations(outputs), self.ds_prior_, self.ds_logpi_)
        x = None
        if with_features:
            raw = np.concatenate([general_features(outputs), np.log(np.maximum(ds_post, 1e-4))], axis=1)
            x = (raw - self.mu_) / self.sd_
        return CandidateData(outputs, x, ds_post)

    def _fit(self, outputs, idx, labels):
        from threadpoolctl import threadpool_limits

        if self.text_features is not None and outputs.texts is None:
            raise MoLAMError("text_features needs the texts of the pool (outputs.texts is None)")
        self.text_model_ = None
        self.temperature_ = 1.0
        self._oof = None
        emb, t_emb, tm = None, 0.0, None
        if self.text_features is not None:  # the encoder runs outside the one-thread limit below
            tm = self._text_model()
            t0 = time.perf_counter()
            emb = tm.inputs(outputs.texts)
            t_emb = time.perf_counter() - t0
        self.members_ = None
        # many tiny fits: thread pools only add contention (tens of times slower on a busy machine)
        with threadpool_limits(limits=int(self.nthread)):
            self._fit_select(outputs, idx, labels)
            if self.drop_members:
                outputs = self._select_members(outputs, idx, labels)
            if tm is not None:
                t0 = time.perf_counter()
                base = normalize_rows(np.clip(np.asarray(self._predict_base(outputs), dtype=np.float64), 0, None))
                found = tm.fit(outputs.texts, base, idx, labels, emb=emb)
                self.text_model_ = tm
                self.metadata["text"] = {"encoder": self.text_features, "embed_seconds": round(t_emb, 3),
                                         "fit_seconds": round(time.perf_counter() - t0, 3), **found}
            if self.calibration == "temperature":
                self._calibrate(outputs, idx, emb)
        self._oof = None

    def _members_of(self, outputs: LLMOutputs) -> LLMOutputs:
        """``outputs`` restricted to the members the fitted model uses."""
        return outputs if self.members_ is None else outputs.select_llms(self.members_)

    def _select_members(self, outputs: LLMOutputs, idx: np.ndarray, labels: np.ndarray) -> LLMOutputs:
        """Keep or drop the members the seeds flag (``drop_members``), by the chosen model's out-of-fold
        accuracy on the seeds with and without them; returns the outputs the fitted model uses. Called after a
        model selection on every member (its state is kept when they stay)."""
        from molal.aggregation.members import check_members

        checks = check_members(outputs, idx, labels)
        bad = [c.name for c in checks if c.problem]
        info: dict[str, Any] = {"flagged": {c.name: c.problem for c in checks if c.problem}, "dropped": []}
        self.metadata["members"] = info
        if not bad:
            return outputs
        keep = [n for n in outputs.llm_names if n not in bad]
        cv_all = self.metadata["cv"][self.choice_]["accuracy"]
        info["cv_accuracy_with"] = cv_all
        if not keep or cv_all is None:  # nothing to compare with: all stay
            return outputs
        saved = (dict(self.__dict__), dict(self.metadata))
        reduced = outputs.select_llms(keep)
        self._fit_select(reduced, idx, labels)
        cv_without = self.metadata["cv"][self.choice_]["accuracy"]
        info["cv_accuracy_without"] = cv_without
        if cv_without is not None and cv_without >= cv_all:  # a flagged member stays only where it wins
            self.members_ = keep
            info["dropped"] = bad
            self.metadata["members"] = info
            return reduced
        self.__dict__.update(saved[0])
        self.metadata = saved[1]
        self.metadata["members"] = info
        return outputs

    def _calibrate(self, outputs: LLMOutputs, idx: np.ndarray, emb) -> None:
        """Fit the temperature on the chosen model's out-of-fold predictions on the seeds (no other label)."""
        from molal.metrics import expected_calibration_error

        if self._oof is None:
            self.metadata["calibration"] = {"method": "temperature", "temperature": 1.0,
                                            "note": "too few seeds for out-of-fold predictions: not calibrated"}
            return
        oof, lab = self._oof
        oof = normalize_rows(np.clip(oof, 0, None))
        if self.text_model_ is not None:  # the text model's predictions for the seeds are cross-fitted too
            tm = self.text_model_
            texts = [outputs.texts[i] for i in idx]
            t = tm.proba(emb[idx], tm.fold_of(texts), outputs.n_classes) ** float(tm.weight)
            oof = normalize_rows(oof * np.tile(t, (len(oof) // len(idx), 1)))
        fitted = fit_temperature(oof, lab)
        after = apply_temperature(oof, fitted)
        before_ll, after_ll = log_loss(oof, lab), log_loss(after, lab)
        # only where the seeds show it: a likelihood-ratio test (1 parameter, 5%) on the seeds' out-of-fold
        # log loss, counted once per seed (the repeats re-use the same seeds)
        gain = 2.0 * len(idx) * (before_ll - after_ll)
        applied = bool(gain > CALIBRATION_LR_CRITICAL)
        self.temperature_ = fitted if applied else 1.0
        self.metadata["calibration"] = {
            "method": "temperature", "temperature": round(self.temperature_, 4), "applied": applied,
            "fitted_temperature": round(fitted, 4), "likelihood_ratio": round(gain, 3),
            "seed_oof_rows": int(len(lab)),
            "seed_oof_log_loss": [round(before_ll, 4), round(after_ll, 4)],
            "seed_oof_ece": [round(expected_calibration_error(oof, lab), 4),
                             round(expected_calibration_error(after, lab), 4)],
        }

    def _fit_select(self, outputs, idx, labels):
        from molal.progress import progress_bar

        k = outputs.n_classes
        _, self.ds_prior_, self.ds_logpi_ = ds_em(ds_observations(outputs), idx, labels)
        ds_post = ds_posterior(ds_observations(outputs), self.ds_prior_, self.ds_logpi_)
        raw = np.concatenate([general_features(outputs), np.log(np.maximum(ds_post, 1e-4))], axis=1)
        self.mu_, self.sd_ = standardize(raw)
        data = CandidateData(outputs, (raw - self.mu_) / self.sd_, ds_post)
        names = self.candidate_names()
        members = self._avg_members(names)
        if "avg" in names:  # the average needs its members' out-of-fold predictions
            names = [n for n in names if n != "avg"] + [m for m in members if m not in names] + ["avg"]
        rng = np.random.default_rng(int(self.seed))
        # out-of-fold predictions on the seeds, repeated stratified K-fold
        n_folds = max(2, min(int(self.n_folds), len(idx)))
        n_repeats = int(self.n_repeats)
        acc: dict[str, list[float]] = {n: [] for n in names}
        ll: dict[str, list[float]] = {n: [] for n in names}
        can_cv = len(idx) >= 2 * n_folds
        oof_runs: list[dict[str, np.ndarray]] = []
        total = n_repeats * n_folds * len(names) if can_cv else 1
        with progress_bar("MoLAM model selection", total, enabled=bool(self.progress)) as bar:
            if can_cv:
                for _ in range(n_repeats):
                    fold = _stratified_folds(labels, n_folds, rng)
                    oof = {n: np.zeros((len(idx), k)) for n in names}
                    for f in range(n_folds):
                        tr, te = fold != f, fold == f
                        for n in names:
                            if n == "avg":
                                continue
                            m = self._candidate(n).fit(data, idx[tr], labels[tr])
                            oof[n][te] = m.predict(data, idx[te])
                            bar.advance()
                        bar.advance()
                    if "avg" in names:
                        oof["avg"] = np.mean([normalize_rows(np.clip(oof[m], 0, None)) for m in members], axis=0)
                    oof_runs.append(oof)
                    for n in names:
                        pr = normalize_rows(np.clip(oof[n], 0, None))
                        acc[n].append(float((pr.argmax(1) == labels).mean()))
                        ll[n].append(float(-np.log(np.maximum(pr[np.arange(len(labels)), labels], 1e-6)).mean()))
        cv = {n: {"accuracy": float(np.mean(acc[n])) if acc[n] else None,
                  "log_loss": float(np.mean(ll[n])) if ll[n] else None} for n in names}
        # best single LLM on all seeds (the safety-net reference)
        ref = BestSingleLLM().fit(outputs, idx, labels)
        ref_acc = float(ref.metadata["seed_accuracy"])
        se = 0.0
        if can_cv:
            # one-standard-error rule: among candidates whose out-of-fold accuracy is within one standard
            # error of the best, take the steadiest (the average of models, then DS, then the best LLM).
            best_acc = max(cv[n]["accuracy"] for n in names)
            se = float(np.sqrt(max(best_acc * (1 - best_acc), 1e-3) / len(idx)))
            steady = {"avg": 3, "ds": 2, "best_single": 1}
            close = [n for n in names if cv[n]["accuracy"] >= best_acc - se]
            choice = max(close, key=lambda n: (steady.get(n, 0), cv[n]["accuracy"], -cv[n]["log_loss"]))
            # safety net: never clearly worse out-of-fold than the best single LLM
            if "best_single" in names and cv[choice]["accuracy"] < cv["best_single"]["accuracy"] - se:
                choice = "best_single"
        else:
            choice = "ds" if "ds" in names else names[0]
        self.choice_ = choice
        if oof_runs:  # the chosen model's out-of-fold predictions on the seeds, every repeat (for calibration)
            self._oof = (np.concatenate([run[choice] for run in oof_runs]), np.tile(labels, len(oof_runs)))
        self.model_ = self._candidate(choice, members=members).fit(data, idx, labels)
        self.metadata.update(
            {
                "choice": choice,
                "cv": cv,
                "cv_folds": n_folds if can_cv else 0,
                "cv_repeats": n_repeats if can_cv else 0,
                "cv_standard_error": se if can_cv else None,
                "best_single_source": ref.metadata["source"],
                "best_single_seed_accuracy": ref_acc,
            }
        )

    def _predict_base(self, outputs):
        outputs = self._members_of(outputs)
        return self.model_.predict(self._data(outputs, with_features=self.model_.uses_features))

    def _predict(self, outputs):
        p = self._predict_base(outputs)
        if self.text_model_ is not None:
            if outputs.texts is None:
                raise MoLAMError("this MoLAM uses text features: the outputs need their texts (outputs.texts is None)")
            base = normalize_rows(np.clip(np.asarray(p, dtype=np.float64), 0, None))
            p = self.text_model_.correct(base, outputs.texts)
        if self.temperature_ != 1.0:
            p = apply_temperature(normalize_rows(np.clip(np.asarray(p, dtype=np.float64), 0, None)), self.temperature_)
        return p

    @property
    def choice(self) -> str | None:
        """The chosen candidate's name (``choice_``; also ``metadata["choice"]``)."""
        return self.choice_

    # -- persistence -------------------------------------------------------------------------------
    def _state(self):
        state = {"choice": self.choice_, "ds_prior": self.ds_prior_, "ds_logpi": self.ds_logpi_,
                 "mu": self.mu_, "sd": self.sd_, "model": self.model_.state()}
        if self.text_model_ is not None:
            state["text_model"] = self.text_model_.state()
        if self.temperature_ != 1.0:
            state["temperature"] = float(self.temperature_)
        if self.members_ is not None:  # only then: files where every member serves stay as they were
            state["members"] = list(self.members_)
        return state

    def _set_state(self, state):
        self.choice_ = state["choice"]
        self.ds_prior_ = np.asarray(state["ds_prior"], dtype=np.float64)
        self.ds_logpi_ = np.asarray(state["ds_logpi"], dtype=np.float64)
        self.mu_ = np.asarray(state["mu"], dtype=np.float64)
        self.sd_ = np.asarray(state["sd"], dtype=np.float64)
        self.model_ = candidate_from_state(state["model"])
        self.temperature_ = float(state.get("temperature", 1.0))  # absent: not calibrated (and earlier files)
        self.members_ = list(state["members"]) if state.get("members") is not None else None  # absent: all
        tm = state.get("text_model")  # absent in files written without text_features (and before it existed)
        self.text_model_ = None
        if tm is not None:
            if self.text_features is None:
                raise MoLAMError("model file has a text model but no text_features parameter")
            self.text_model_ = self._text_model()
            self.text_model_.set_state(tm)
