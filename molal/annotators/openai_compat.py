"""OpenAI-compatible HTTP annotator (``vllm serve``, Ollama, llama.cpp server, hosted APIs), over httpx.

Class scores (``scoring``):
  * ``"top_logprobs"`` (the default for both APIs): one generated token with its ``top_logprobs``; every
    top token whose stripped, lower-cased text is a non-empty prefix of a class verbalizer gives its
    probability to that class. A token that is a prefix of several verbalizers (an ambiguous first token of
    multi-token names, e.g. "n" for "numeric"/"number"): with the completions API it is *followed* — the
    prompt plus that token is sent again and the next token's top logprobs split its mass
    (:func:`walk_class_mass`, up to 4 tokens deep); with the chat API (which cannot continue a partial
    answer portably) it is split equally among those classes. The class masses are renormalised. A row
    where no top token starts any class is *failed* ("no class among the top-N tokens"), never silently
    uniform.
  * ``"echo"`` (completions API only; opt-in): for every (text, class) the request scores
    ``prompt + " " + verbalizer`` with ``echo=true, logprobs=0``; log P(label | prompt) is the sum of the
    logprobs of the echoed tokens at or after the end of the prompt (by ``text_offset``; a token that
    straddles the boundary counts as a label token), then a softmax over the classes. Exact for multi-token
    class names, but only as right as the server's echo: llama-cpp-python's server (0.3.36) returns echoed
    logprobs shifted by one token, so echo is never the default and is **verified** before use (below).

Server features each path needs, checked once per (server, model, path) before the first request that
relies on them (:meth:`OpenAIAnnotator.check_server`, also ``molal annotate --check``), each failure a
clear :class:`~molal.annotators.base.AnnotatorError` naming the feature — never silent garbage:

  ============================  ==========================================================================
  path                          needs
  ============================  ==========================================================================
  chat + top_logprobs           ``logprobs: true`` and ``top_logprobs`` (depth ``top_logprobs``; fewer
                                returned than asked is allowed and logged: OpenAI caps it at 20)
  completions + top_logprobs    ``logprobs: N`` returning ``top_logprobs`` per generated token
  completions + echo            ``echo: true`` with prompt logprobs and ``text_offset``, **aligned**: the
                                echoed logprob of a token equals the logprob the server gives the same
                                token when it generates it (a probe prompt; off by one -> error). Several
                                prompts per request (``prompts_per_request``) when the server takes a
                                list; a server that refuses a list gets one prompt per request (logged)
  samples > 0                   ``n`` returning n choices (else the row fails naming ``n``)
  ============================  ==========================================================================

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
    check_calibrate,
    check_float,
    check_name,
    check_positive_int,
    consistency_from_answers,
    current_deadline,
)
from molal.annotators.prompts import Prompt

log = logging.getLogger(__name__)
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

#: probe prompts for the echo check: each is sent once to be continued by one greedy token T, then
#: ``prompt + T`` is echoed; the echoed logprob of T must equal the logprob the server gave T as it generated it
ECHO_PROBES = ("The capital of France is", "My favourite colour is", "Once upon a time, there was a",
               "The cat sat on the")
ECHO_TOLERANCE = 0.05  # nats: kernels may differ slightly between a prompt pass and a generation step
#: results of :meth:`OpenAIAnnotator.check_server`, per (base_url, model, path, options): one check per process
_CHECKED: dict[tuple[Any, ...], dict[str, Any]] = {}
_CHECK_LOCK = threading.Lock()


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


def chat_top_logprobs(resp: dict[str, Any]) -> dict[str, float]:
    """Token text -> logprob at the first generated position of a chat/completions response (OpenAI's
    ``choices[0].logprobs.content[0]``: the token and its ``top_logprobs`` list; vLLM, llama.cpp's server and
    Ollama answer in this shape). Raises KeyError/IndexError/TypeError/ValueError on another shape."""
    content = resp["choices"][0]["logprobs"]["content"][0]
    top = {str(d["token"]): float(d["logprob"]) for d in content["top_logprobs"]}
    top.setdefault(str(content["token"]), float(content["logprob"]))
    return top


def completion_top_logprobs(resp: dict[str, Any]) -> dict[str, float]:
    """Token text -> logprob at the first generated position of a (legacy) completions response
    (``choices[0].logprobs.top_logprobs[0]``, a table; OpenAI, vLLM and llama.cpp's server). Raises on
    another shape, and on an empty table (a server that ignored ``logprobs``)."""
    top = resp["choices"][0]["logprobs"]["top_logprobs"][0]
    if not isinstance(top, dict) or not top:
        raise ValueError("no top_logprobs table")
    return {str(t): float(v) for t, v in top.items()}


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

    _runtime = {"_client": lambda: None, "_lock": threading.Lock}

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
        examples: list[dict[str, str]] | str | None = None,
        examples_per_class: int = 1,
        preset: str | None = None,
        scoring: str = "auto",
        calibrate: str | None = None,
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
        usd_per_mtok_prompt: float | None = None,
        usd_per_mtok_completion: float | None = None,
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
        self.prompt = Prompt.build(template, system, answer_prefix, verbalizers, examples, preset, examples_per_class)
        if scoring == "auto":  # echo is exact but servers get it wrong silently: opt-in and verified
            scoring = "top_logprobs"
        if scoring not in ("echo", "top_logprobs"):
            raise ValueError(f"scoring must be 'auto', 'echo' or 'top_logprobs', got {scoring!r}")
        if scoring == "echo" and api == "chat":
            raise ValueError("scoring='echo' needs api='completions' (chat APIs cannot echo the prompt)")
        self.scoring = scoring
        self.calibrate = check_calibrate(calibrate)
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
        # prices (US dollars per million tokens) for cost estimates (molal.annotators.cost); not in the identity
        self.usd_per_mtok_prompt = None if usd_per_mtok_prompt is None else check_float(
            usd_per_mtok_prompt, "usd_per_mtok_prompt", 0.0, 1e6)
        self.usd_per_mtok_completion = None if usd_per_mtok_completion is None else check_float(
            usd_per_mtok_completion, "usd_per_mtok_completion", 0.0, 1e6)
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

    # -- cost ----------------------------------------------------------------------------------------
    def price(self) -> tuple[float | None, float | None]:
        """(prompt, completion) US dollars per million tokens, as configured (None: not configured)."""
        return self.usd_per_mtok_prompt, self.usd_per_mtok_completion

    def usage(self, texts: list[str], class_names: list[str], descriptions: dict[str, str]) -> dict[str, Any]:
        """Requests and (approximate: 4 characters a token, +8 per chat request for the template) tokens that
        annotating ``texts`` will send: one request per text (top_logprobs; an ambiguous first token costs one
        more), one per (text, class) with echo, and one with ``n`` answers of ``max_tokens`` when sampling."""
        from molal.annotators.cost import approx_tokens

        words = self.prompt.label_words(class_names)
        k = len(class_names)
        req = ptok = ctok = 0
        for t in texts:
            if self.api == "chat":
                p = approx_tokens("\n".join(m["content"] for m in self.prompt.messages(t, class_names, descriptions))) + 8
            else:
                p = approx_tokens(self.prompt.plain(t, class_names, descriptions))
            if self.scoring == "echo":
                req += k
                ptok += sum(p + approx_tokens(" " + w) for w in words)
                ctok += k
            else:
                req += 1
                ptok += p
                ctok += 1
            if self.samples:
                req += 1
                ptok += p
                ctok += self.samples * self.max_tokens
        return {"requests": req, "prompt_tokens": ptok, "completion_tokens": ctok, "exact": False}

    # -- server check --------------------------------------------------------------------------------
    def _check_key(self) -> tuple[Any, ...]:
        return (self.base_url, self.model, self.api, self.scoring, self.top_logprobs, self.samples > 0)

    def check_server(self, deadline: float | None = None) -> dict[str, Any]:
        """Check, once per process for this server, model and path, that the server has the features this
        annotator's scoring needs (module docstring's table) and that they answer correctly. Returns what
        was found (e.g. ``{"path": "completions+echo", "echo_aligned": True, "prompts_per_request": 1}``);
        raises :class:`AnnotatorError` naming the missing or wrong feature. Called before the first
        annotation; ``molal annotate --check`` calls it for every remote annotator of a mixture."""
        key = self._check_key()
        with _CHECK_LOCK:
            found = _CHECKED.get(key)
        if found is None:
            found = self._probe(deadline)
            with _CHECK_LOCK:
                _CHECKED[key] = found
        if found.get("prompts_per_request"):
            self.prompts_per_request = min(self.prompts_per_request, int(found["prompts_per_request"]))
        return dict(found)

    def _feature_error(self, what: str, hint: str) -> AnnotatorError:
        return AnnotatorError(f"annotator {self.name!r}: the server at {self.base_url} (model {self.model!r}) {what}; {hint}")

    def _probe(self, deadline: float | None) -> dict[str, Any]:
        found: dict[str, Any] = {"path": f"{self.api}+{self.scoring}"}
        if self.scoring == "echo":
            found.update(self._probe_echo(deadline))
        else:
            chat = self.api == "chat"
            n = self.top_logprobs
            if chat:
                body: dict[str, Any] = {"messages": [{"role": "user", "content": "Name a colour."}], "logprobs": True,
                                        "top_logprobs": n}
            else:
                body = {"prompt": ECHO_PROBES[0], "logprobs": n}
            body.update(model=self.model, max_tokens=1, temperature=0.0)
            path = "chat/completions" if chat else "completions"
            resp = self.post(path, body, deadline=deadline)
            try:
                depth = len(chat_top_logprobs(resp) if chat else completion_top_logprobs(resp))
            except (KeyError, IndexError, TypeError, ValueError):
                depth = 0
            if depth == 0:
                sent = f"logprobs=true, top_logprobs={n}" if chat else f"logprobs={n}"
                raise self._feature_error(
                    f"returned no top_logprobs on {path} (sent {sent})",
                    ("molal's chat scoring needs them. Set api = \"completions\" on this member (a plain prompt; "
                     "llama.cpp's server answers chat requests without top_logprobs for a model without a chat "
                     "template, such as the base Gemma-3-270M, and returns them on completions), or use a model or "
                     "server that returns them on chat/completions (vLLM, OpenAI)") if chat else
                    ("molal's completions scoring needs them: set api = \"chat\" on this member, or use a server that "
                     "returns them on completions (vLLM, llama.cpp's server, OpenAI)"))
            found["top_logprobs_depth"] = depth
        if found.get("top_logprobs_depth", self.top_logprobs) < self.top_logprobs:
            log.warning("annotator %s: the server returns %d top logprobs where %d were asked; classes whose first token "
                        "is rarer get no mass", self.name, found["top_logprobs_depth"], self.top_logprobs)
        if self.samples > 0:
            if self.api == "chat":
                body = {"model": self.model, "messages": [{"role": "user", "content": "Name a colour."}]}
                path = "chat/completions"
            else:
                body = {"model": self.model, "prompt": ECHO_PROBES[1]}
                path = "completions"
            body.update(n=2, max_tokens=1, temperature=max(self.temperature, 0.1), top_p=self.top_p)
            got = len(self.post(path, body, deadline=deadline).get("choices") or [])
            if got != 2:
                raise self._feature_error(f"returned {got} choice(s) for n=2", "self-consistency (samples > 0) needs n: set samples = 0 for this server")
            found["n"] = True
        log.info("annotator %s: server check passed: %s", self.name, found)
        return found

    def _probe_echo(self, deadline: float | None) -> dict[str, Any]:
        """Echo must return prompt logprobs aligned with their tokens, and may or may not take a prompt list."""
        checked, informative = 0, 0
        for probe in ECHO_PROBES:
            gen = self.post("completions", {"model": self.model, "prompt": probe, "max_tokens": 1, "temperature": 0.0,
                                            "logprobs": 1}, deadline=deadline)
            try:
                ch = gen["choices"][0]
                token = ch["text"]
                want = float(ch["logprobs"]["token_logprobs"][0])
            except (KeyError, IndexError, TypeError, ValueError):
                raise self._feature_error("returned no logprobs for a generated token on completions (sent logprobs=1)",
                                          "scoring='echo' needs them: use scoring='top_logprobs'") from None
            if not token or not token.strip() or not np.isfinite(want):
                continue
            full = probe + token
            echo = self.post("completions", {"model": self.model, "prompt": full, "echo": True, "logprobs": 0,
                                             "max_tokens": 1, "temperature": 0.0}, deadline=deadline)
            try:
                lp = echo["choices"][0]["logprobs"]
                offs, lps, toks = lp["text_offset"], lp["token_logprobs"], lp["tokens"]
            except (KeyError, IndexError, TypeError):
                raise self._feature_error("returned no echoed prompt logprobs (sent echo=true, logprobs=0)",
                                          "use scoring='top_logprobs'") from None
            at = [j for j, o in enumerate(offs) if o == len(probe) and j < len(toks) and toks[j] == token]
            if not at or lps[at[0]] is None:
                continue  # the echo tokenised prompt+T differently: this probe cannot tell; try the next
            got = float(lps[at[0]])
            if abs(got - want) > ECHO_TOLERANCE:
                raise self._feature_error(
                    f"echoes prompt logprobs that do not match its own: {token!r} after {probe!r} is generated with "
                    f"logprob {want:.3f} but echoed with {got:.3f} (the echoed logprobs look shifted by a token)",
                    "scores built on them would be silently wrong; use scoring='top_logprobs'")
            checked += 1
            informative += abs(want) > 0.1
            if checked >= 2 and informative:
                break
        if not checked or not informative:
            raise self._feature_error("could not be verified for echo (no probe token could be matched, or every one was "
                                      "certain)", "use scoring='top_logprobs'")
        out: dict[str, Any] = {"echo_aligned": True}
        if self.prompts_per_request > 1:
            try:
                resp = self.post("completions", {"model": self.model, "prompt": list(ECHO_PROBES[:2]), "echo": True,
                                                 "logprobs": 0, "max_tokens": 1, "temperature": 0.0}, deadline=deadline)
                batched = len(resp.get("choices") or []) == 2
            except AnnotatorError as exc:
                if not getattr(exc, "row_level", False):
                    raise
                batched = False
            if not batched:
                log.warning("annotator %s: %s takes one prompt per request: echo scoring sends one (text, class) per request",
                            self.name, self.base_url)
                out["prompts_per_request"] = 1
        return out

    # -- scoring ---------------------------------------------------------------------------------------
    def _annotate(self, texts: list[str], class_names: list[str], descriptions: dict[str, str]) -> AnnotatorResult:
        self.prompt.check_classes(class_names)
        words = self.prompt.label_words(class_names)
        n, k = len(texts), len(class_names)
        dl = current_deadline()  # jobs run in worker threads: capture the caller's deadline here
        self.check_server(dl)  # once per process and server: a missing or wrong feature is an error, not garbage

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
                        top = chat_top_logprobs(resp)
                    except (KeyError, IndexError, TypeError, ValueError):
                        failed[i] = "no top_logprobs in the response"
                        return
                else:
                    try:
                        mass = walk_class_mass(self._completion_top(count, dl), self.prompt.plain(texts[i], class_names, descriptions), words)
                    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
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
            return completion_top_logprobs(resp)

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
