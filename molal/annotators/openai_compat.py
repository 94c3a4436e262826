"""OpenAI-compatible HTTP annotator (``vllm serve``, Ollama, llama.cpp server, hosted APIs), over httpx.

Class scores (``scoring``):
  * ``"echo"`` (completions API only; the default there): for every (text, class) the request scores
    ``prompt + " " + verbalizer`` with ``echo=true, logprobs=0``; log P(label | prompt) is the sum of the
    logprobs of the echoed tokens at or after the end of the prompt (by ``text_offset``; a token that
    straddles the boundary counts as a label token), then a softmax over the classes. Exact for multi-token
    class names. Several prompts go in one request (``prompt`` as a list, ``prompts_per_request``).
  * ``"top_logprobs"`` (chat API, or completions servers without echo): one generated token with its
    ``top_logprobs``; every top token whose stripped, lower-cased text is a non-empty prefix of a class
    verbalizer gives its probability to that class. A token that is a prefix of several verbalizers (an
    ambiguous first token of multi-token names, e.g. "n" for "numeric"/"number"): with the completions
    API it is *followed* — the prompt plus that token is sent again and the next token's top logprobs
    split its mass (:func:`walk_class_mass`, up to 4 tokens deep); with the chat API (which cannot
    continue a partial answer portably) it is split equally among those classes. The class masses are
    renormalised. A row where no top token starts any class is *failed* ("no class among the top-N
    tokens"), never silently uniform.

Self-consistency (``samples = T > 0``): one request with ``n=T`` (temperature, top_p, max_tokens), the
answers matched to classes with :func:`molal.annotators.base.match_answer`.

Robustness: ``concurrency`` parallel requests, ``timeout`` per request, retries with exponential backoff
(+ jitter, honouring ``Retry-After``) on 429/5xx and connection errors, bounded by ``max_retries`` and
``max_total_s``. A server that cannot be reached (after retries) or rejects the key raises
:class:`~molal.annotators.base.AnnotatorUnavailable`. The API key comes from ``api_key_env`` (preferred) or
``api_key``; it is registered as a secret (never logged) and is not part of the identity.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from molal.annotators.base import (
    Annotator,
    AnnotatorError,
    AnnotatorResult,
    AnnotatorUnavailable,
    DeadlineReached,
    check_float,
    check_name,
    check_positive_int,
    consistency_from_answers,
    current_deadline,
)
from molal.annotators.prompts import Prompt

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def label_logprob_from_echo(logprobs: dict[str, Any], prompt_len: int, full_len: int) -> float:
    """Sum of the echoed token logprobs that cover characters ``[prompt_len, full_len)``."""
    toks = logprobs.get("tokens") or []
    lps = logprobs.get("token_logprobs") or []
    offs = logprobs.get("text_offset") or []
    if not (len(toks) == len(lps) == len(offs)) or not toks:
        raise ValueError("echo logprobs missing tokens/token_logprobs/text_offset")
    total, used = 0.0, 0
    for t, lp, off in zip(toks, lps, offs, strict=True):
        end = off + len(t)
        if off < full_len and end > prompt_len:  # the token overlaps the label's characters
            if lp is None:
                raise ValueError("a label token has no logprob")
            total += float(lp)
            used += 1
    if used == 0:
        raise ValueError("no echoed token covers the label")
    return total


def class_mass_from_top(top: dict[str, float], words: list[str]) -> np.ndarray:
    """Probability mass per class from one position's top logprobs (token text -> logprob)."""
    lw = [w.strip().lower() for w in words]
    mass = np.zeros(len(words))
    for tok, lp in top.items():
        s = tok.strip().lower()
        if not s:
            continue
        hits = [k for k, w in enumerate(lw) if w.startswith(s)]
        for k in hits:
            mass[k] += float(np.exp(lp)) / len(hits)
    return mass


def walk_class_mass(
    top_fn: Any, prompt: str, words: list[str], max_depth: int = 4, min_mass: float = 1e-3
) -> np.ndarray:
    """Class probabilities from next-token top logprobs, following ambiguous tokens (completions API).

    ``top_fn(text)`` returns the top next tokens of ``text`` (token text -> logprob). A top token whose text
    (first step: leading whitespace stripped, case-insensitive) is a prefix of exactly one class's remaining
    verbalizer gives its probability to that class. A token shared by several classes (e.g. "n" for
    "numeric"/"number") is followed: ``top_fn(prompt + token)`` is asked for the next token and its mass
    is split by the same rule, recursively (``max_depth`` steps; tokens below ``min_mass`` are split equally
    instead). A class whose verbalizer ends with the token keeps the mass that does not continue another
    class. Mass of tokens that start no class is dropped; the caller renormalises.
    """
    k = len(words)

    def rec(prefix: str, rem: dict[int, str], depth: int) -> np.ndarray:
        mass = np.zeros(k)
        for tok, lp in top_fn(prefix).items():
            p = float(np.exp(lp))
            t = (tok.lstrip() if depth == 0 else tok).lower()
            if not t:
                continue
            cands = {c: r for c, r in rem.items() if r.lower().startswith(t)}
            # a token that runs past a whole class name ("human." for "human") completes that class
            cands.update({c: r for c, r in rem.items() if r and t.startswith(r.lower()) and not t[len(r) : len(r) + 1].isalnum()})
            if not cands:
                continue
            if len(cands) == 1:
                mass[next(iter(cands))] += p
                continue
            rest = {c: r[len(t) :] for c, r in cands.items()}
            done = [c for c, r in rest.items() if not r]
            cont = {c: r for c, r in rest.items() if r}
            if depth + 1 >= max_depth or p < min_mass or not cont:
                for c in cands:
                    mass[c] += p / len(cands)
                continue
            child = rec(prefix + tok, cont, depth + 1)
            mass += p * child
            if done:
                mass[done[0]] += p * max(0.0, 1.0 - float(child.sum()))
        return mass

    return rec(prompt, {c: w.strip() for c, w in enumerate(words)}, 0)


class OpenAIAnnotator(Annotator):
    """One model behind an OpenAI-compatible endpoint. See the module docstring."""

    type = "openai"
    remote = True  # I/O-bound: a mixture runs remote annotators concurrently

    def __init__(
        self,
        name: str,
        base_url: str,
        model: str,
        api: str = "chat",
        api_key: str | None = None,
        api_key_env: str | None = None,
        template: str | None = None,
        system: str | None = None,
        answer_prefix: str | None = None,
        verbalizers: dict[str, str] | None = None,
        examples: list[dict[str, str]] | None = None,
        preset: str | None = None,
        scoring: str = "auto",
        top_logprobs: int = 20,
        samples: int = 0,
        temperature: float = 0.7,
        top_p: float = 0.9,
        max_tokens: int = 8,
        seed: int | None = None,
        concurrency: int = 4,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_total_s: float = 300.0,
        batch_size: int = 16,
        prompts_per_request: int = 32,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.name = check_name(name)
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        if not isinstance(model, str) or not model:
            raise ValueError("model must be a non-empty string")
        self.model = model
        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions', got {api!r}")
        self.api = api
        if api_key_env is not None and not isinstance(api_key_env, str):
            raise ValueError("api_key_env must be the name of an environment variable")
        self.api_key_env = api_key_env
        self._api_key = api_key
        if api_key:
            from molal.logging import register_secret

            register_secret(api_key)
        self.prompt = Prompt.build(template, system, answer_prefix, verbalizers, examples, preset)
        if scoring == "auto":
            scoring = "echo" if api == "completions" else "top_logprobs"
        if scoring not in ("echo", "top_logprobs"):
            raise ValueError(f"scoring must be 'auto', 'echo' or 'top_logprobs', got {scoring!r}")
        if scoring == "echo" and api == "chat":
            raise ValueError("scoring='echo' needs api='completions' (chat APIs cannot echo the prompt)")
        self.scoring = scoring
        self.top_logprobs = check_positive_int(top_logprobs, "top_logprobs")
        self.samples = check_positive_int(samples, "samples", 0)
        self.temperature = check_float(temperature, "temperature", 0.0, 10.0)
        self.top_p = check_float(top_p, "top_p", 0.0, 1.0, lo_open=True)
        self.max_tokens = check_positive_int(max_tokens, "max_tokens")
        self.seed = seed
        self.concurrency = check_positive_int(concurrency, "concurrency")
        self.timeout = check_float(timeout, "timeout", 0.0, 3600.0, lo_open=True)
        self.max_retries = check_positive_int(max_retries, "max_retries", 0)
        self.backoff = check_float(backoff, "backoff", 0.0, 60.0)
        self.max_total_s = check_float(max_total_s, "max_total_s", 0.0, 86400.0, lo_open=True)
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.prompts_per_request = check_positive_int(prompts_per_request, "prompts_per_request")
        self.extra_body = dict(extra_body or {})
        self._client: Any = None
        self._lock = threading.Lock()

    # -- plumbing --------------------------------------------------------------------------------------
    def _key(self) -> str | None:
        if self.api_key_env:
            v = os.environ.get(self.api_key_env)
            if not v:
                raise AnnotatorUnavailable(f"annotator {self.name!r}: environment variable {self.api_key_env} is not set")
            from molal.logging import register_secret

            register_secret(v)
            return v
        return self._api_key

    def _http(self) -> Any:
        with self._lock:
            if self._client is None:
                import httpx

                headers = {"Content-Type": "application/json"}
                key = self._key()
                if key:
                    headers["Authorization"] = f"Bearer {key}"
                self._client = httpx.Client(
                    headers=headers, timeout=httpx.Timeout(self.timeout),
                    limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
                )
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _identity(self) -> dict[str, Any]:
        return {
            "base_url": self.base_url,
            "model": self.model,
            "api": self.api,
            "prompt": self.prompt.identity(),
            "scoring": self.scoring,
            "top_logprobs": self.top_logprobs,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "extra_body": self.extra_body,
        }

    def post(self, path: str, body: dict[str, Any], deadline: float | None = None) -> dict[str, Any]:
        """POST with retries/backoff. Raises AnnotatorUnavailable / AnnotatorError with a clear message, or
        DeadlineReached when ``deadline`` (time.monotonic()) passes first (timeouts are capped by it)."""
        import httpx

        from molal.logging import scrub

        url = f"{self.base_url}/{path}"
        client = self._http()
        t0 = time.monotonic()
        attempt = 0
        while True:
            wait = None
            timeout = self.timeout
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineReached(f"annotator {self.name!r}: deadline reached")
                timeout = min(timeout, left)
            try:
                r = client.post(url, json={**body, **self.extra_body}, timeout=timeout)
                if r.status_code == 200:
                    try:
                        return r.json()
                    except ValueError:
                        bad = AnnotatorError(f"annotator {self.name!r}: {url} returned invalid JSON")
                        bad.row_level = True  # this answer is broken, not the server: only its rows fail
                        raise bad from None
                msg = scrub(" ".join(r.text[:300].split()))
                if r.status_code in (401, 403):
                    raise AnnotatorUnavailable(f"annotator {self.name!r}: {url} refused the API key (HTTP {r.status_code}): {msg}")
                if r.status_code not in RETRY_STATUS:
                    bad = AnnotatorError(f"annotator {self.name!r}: {url} answered HTTP {r.status_code}: {msg}")
                    bad.row_level = True  # e.g. 400 for this prompt (too long): only its rows fail
                    raise bad
                err: Exception = AnnotatorError(f"annotator {self.name!r}: {url} answered HTTP {r.status_code}: {msg}")
                ra = r.headers.get("Retry-After")
                if ra:
                    try:
                        wait = min(float(ra), 30.0)
                    except ValueError:
                        wait = None
            except httpx.TransportError as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineReached(f"annotator {self.name!r}: deadline reached during a request") from None
                err = AnnotatorUnavailable(
                    f"annotator {self.name!r}: cannot reach {self.base_url} ({type(exc).__name__}: {scrub(str(exc))})"
                )
            attempt += 1
            elapsed = time.monotonic() - t0
            if wait is None:
                wait = self.backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random())
            if attempt > self.max_retries or elapsed + wait > self.max_total_s:
                raise type(err)(f"{err} [gave up after {attempt} attempt(s) in {elapsed:.1f}s]")
            if deadline is not None and time.monotonic() + wait >= deadline:
                raise DeadlineReached(f"annotator {self.name!r}: deadline reached while retrying ({err})")
            log.info("annotator %s: retry %d in %.2fs (%s)", self.name, attempt, wait, err)
            time.sleep(wait)

    # -- scoring ---------------------------------------------------------------------------------------
    def _annotate(self, texts: list[str], class_names: list[str], descriptions: dict[str, str]) -> AnnotatorResult:
        self.prompt.check_classes(class_names)
        words = self.prompt.label_words(class_names)
        n, k = len(texts), len(class_names)
        dl = current_deadline()  # jobs run in worker threads: capture the caller's deadline here

        def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
            return self.post(path, body, deadline=dl)

        def row_job(fn: Any, rows: list[int]) -> Any:
            """``fn`` with an error that concerns its own answer (malformed JSON, a 4xx for this prompt)
            failing only ``rows``; anything else (server unreachable or failing after its retries, key
            refused, deadline) still stops the batch."""

            def run() -> None:
                try:
                    fn()
                except AnnotatorError as exc:
                    if not getattr(exc, "row_level", False):
                        raise
                    for i in rows:
                        failed.setdefault(i, str(exc))

            return run

        probs = np.full((n, k), np.nan)
        failed: dict[int, str] = {}
        tokens = [0]
        tlock = threading.Lock()

        def count(resp: dict[str, Any]) -> None:
            u = (resp.get("usage") or {}).get("total_tokens")
            if isinstance(u, int):
                with tlock:
                    tokens[0] += u

        jobs: list[Any] = []
        if self.scoring == "echo":
            plains = [self.prompt.plain(t, class_names, descriptions) for t in texts]
            pairs = [(i, c) for i in range(n) for c in range(k)]
            scores = np.full((n, k), np.nan)
            for s in range(0, len(pairs), self.prompts_per_request):
                part = pairs[s : s + self.prompts_per_request]

                def job(part=part) -> None:
                    full = [plains[i] + " " + words[c] for i, c in part]
                    body = {"model": self.model, "prompt": full, "echo": True, "logprobs": 0, "max_tokens": 1, "temperature": 0.0}
                    resp = post("completions", body)
                    count(resp)
                    by_index = {int(ch.get("index", j)): ch for j, ch in enumerate(resp.get("choices") or [])}
                    for j, (i, c) in enumerate(part):
                        ch = by_index.get(j)
                        try:
                            if ch is None or not ch.get("logprobs"):
                                raise ValueError("no logprobs in the response (does the server support echo?)")
                            scores[i, c] = label_logprob_from_echo(ch["logprobs"], len(plains[i]), len(full[j]))
                        except (ValueError, TypeError) as exc:
                            failed.setdefault(i, f"bad echo logprobs: {exc}")

                jobs.append(row_job(job, sorted({i for i, _ in part})))
        else:
            scores = None

            def top_job(i: int) -> None:
                if self.api == "chat":
                    body = {"model": self.model, "messages": self.prompt.messages(texts[i], class_names, descriptions),
                            "max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": self.top_logprobs}
                    resp = post("chat/completions", body)
                    count(resp)
                    try:
                        content = resp["choices"][0]["logprobs"]["content"][0]
                        top = {d["token"]: float(d["logprob"]) for d in content["top_logprobs"]}
                        top.setdefault(content["token"], float(content["logprob"]))
                    except (KeyError, IndexError, TypeError):
                        failed[i] = "no top_logprobs in the response"
                        return
                else:
                    try:
                        mass = walk_class_mass(self._completion_top(count, dl), self.prompt.plain(texts[i], class_names, descriptions), words)
                    except (KeyError, IndexError, TypeError, AttributeError):
                        failed[i] = "no top_logprobs in the response"
                        return
                    if mass.sum() <= 0:
                        failed[i] = f"no class among the top-{self.top_logprobs} first tokens"
                        return
                    probs[i] = mass / mass.sum()
                    return
                mass = class_mass_from_top(top, words)
                if mass.sum() <= 0:
                    failed[i] = f"no class among the top-{self.top_logprobs} first tokens"
                    return
                probs[i] = mass / mass.sum()

            jobs += [row_job(lambda i=i: top_job(i), [i]) for i in range(n)]

        cons = None
        if self.samples > 0:
            cons = np.zeros((n, k))

            def sample_job(i: int) -> None:
                if self.api == "chat":
                    body = {"model": self.model, "messages": self.prompt.messages(texts[i], class_names, descriptions)}
                    path = "chat/completions"
                else:
                    body = {"model": self.model, "prompt": self.prompt.plain(texts[i], class_names, descriptions)}
                    path = "completions"
                body.update(n=self.samples, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens)
                if self.seed is not None:
                    body["seed"] = self.seed
                resp = post(path, body)
                count(resp)
                ch = resp.get("choices") or []
                answers = [(c.get("message") or {}).get("content") or "" if self.api == "chat" else c.get("text", "") for c in ch]
                if len(answers) != self.samples:
                    failed.setdefault(i, f"asked for n={self.samples} samples, got {len(answers)}")
                    return
                cons[i] = consistency_from_answers(answers, class_names, words)

            jobs += [row_job(lambda i=i: sample_job(i), [i]) for i in range(n)]

        down: AnnotatorUnavailable | None = None
        try:
            self._run(jobs)
        except AnnotatorUnavailable as exc:  # the server died mid-batch: keep the answers that arrived
            down = exc
        if scores is not None:
            ok = np.isfinite(scores).all(axis=1)
            z = np.where(ok[:, None], scores, 0.0)
            z = np.exp(z - z.max(axis=1, keepdims=True))
            probs = np.where(ok[:, None], z / z.sum(axis=1, keepdims=True), np.nan)
            for i in np.where(~ok)[0]:
                failed.setdefault(int(i), str(down) if down is not None else "missing label scores")
        result = AnnotatorResult(probs=probs, consistency=cons, failed=failed, tokens=tokens[0] or None)
        if down is not None:
            if cons is not None:  # a row needs both its scores and its samples
                for i in range(n):
                    if i not in failed and not np.isfinite(cons[i]).all():
                        failed[i] = str(down)
            for i in range(n):
                if i not in failed and not np.isfinite(probs[i]).all():
                    failed[i] = str(down)
            down.partial = result  # molal.annotators.Mixture caches the finished rows, then gives up
            raise down
        return result

    def _completion_top(self, count: Any, deadline: float | None = None) -> Any:
        def top(prompt: str) -> dict[str, float]:
            body = {"model": self.model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": self.top_logprobs}
            resp = self.post("completions", body, deadline=deadline)
            count(resp)
            return {t: float(v) for t, v in resp["choices"][0]["logprobs"]["top_logprobs"][0].items()}

        return top

    def _run(self, jobs: list[Any]) -> None:
        """Run request jobs with at most ``concurrency`` in flight; the first backend error is raised."""
        if self.concurrency == 1 or len(jobs) <= 1:
            for j in jobs:
                j()
            return
        with ThreadPoolExecutor(max_workers=self.concurrency) as ex:
            futures = [ex.submit(j) for j in jobs]
            first: BaseException | None = None
            for f in futures:
                if f.cancelled():  # cancelled after the first error below: nothing to collect
                    continue
                try:
                    f.result()
                except AnnotatorError as exc:
                    if first is None:
                        first = exc
                        for g in futures:
                            g.cancel()
            if first is not None:
                raise first
