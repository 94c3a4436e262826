"""Test helpers: a tiny random Llama-style causal LM built locally, and a real OpenAI-compatible HTTP server
(Flask on 127.0.0.1, in a thread) that serves /v1/completions and /v1/chat/completions from it with real
log-probabilities. Also used by bench/annotate.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = [
    "Classify the text into exactly one of these categories: human, location, numeric.",
    "Text: Who wrote the book ? Answer with the category name only. Category: human",
    "Text: Where is the city ? Category: location",
    "Text: How many people live there ? Category: numeric",
    "You are a careful annotator for text classification.",
    "the a of to in is was what who where when how many much which city country person",
]


def build_tiny_lm(path: str | Path, seed: int = 0, vocab_size: int = 320, chat: bool = True, hidden: int = 64) -> Path:
    """A random tiny LlamaForCausalLM + byte-level BPE tokenizer (trained on a few lines) in ``path``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS * 3, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.3,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return path


class TinyLMServer:
    """OpenAI-compatible server on 127.0.0.1 backed by a local causal LM (real forward passes).

    Supports: completions (prompt str|list, echo, logprobs=int, max_tokens>=0, n, temperature, top_p, seed)
    and chat completions (messages, logprobs, top_logprobs, n, max_tokens...). ``fail_next(k, status)``
    makes the next k requests answer ``status`` (429/500...) to test retries. ``requests`` counts calls.

    Faults of real servers, to test that molal notices them: ``echo_shift`` echoes prompt logprobs shifted by
    one token as llama-cpp-python's server 0.3.36 does (the entry of a token carries the next position's
    logprob); ``one_prompt`` answers 400 to a prompt list (that server again); ``no_logprobs`` ignores
    ``logprobs``/``top_logprobs`` (servers without logprob support).
    """

    def __init__(self, model_dir: str | Path, api_key: str | None = None, delay_s: float = 0.0,
                 echo_shift: bool = False, one_prompt: bool = False, no_logprobs: bool = False) -> None:
        import torch
        from flask import Flask, jsonify, request
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from werkzeug.serving import make_server

        self.tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.lm = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
        self.model_name = "tiny-llama"
        self.api_key = api_key
        self.delay_s = delay_s
        self.echo_shift, self.one_prompt, self.no_logprobs = echo_shift, one_prompt, no_logprobs
        self.requests = 0
        self.bodies: list[dict[str, Any]] = []
        self.spans: list[tuple[float, float]] = []  # (start, end) wall times of answered requests
        self.auth_headers: list[str | None] = []
        self._fail: list[int] = []
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        app = Flask("tiny-openai")

        self.active = 0

        @app.before_request
        def _start():
            request.environ["molal.t0"] = time.time()
            with self._lock:
                self.active += 1

        @app.teardown_request
        def _end(exc=None):
            with self._lock:
                self.active -= 1
                self.spans.append((request.environ.get("molal.t0", time.time()), time.time()))
        torch.set_num_threads(1)

        def guard():
            with self._lock:
                self.requests += 1
                self.auth_headers.append(request.headers.get("Authorization"))
                status = self._fail.pop(0) if self._fail else None
            if self.delay_s:
                time.sleep(self.delay_s)
            if status is not None:
                return jsonify({"error": {"message": f"injected {status}"}}), status
            if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return jsonify({"error": {"message": "bad key"}}), 401
            body = request.get_json(force=True)
            self.bodies.append(body)
            return body

        @app.post("/v1/completions")
        def completions():
            body = guard()
            if not isinstance(body, dict):
                return body
            if self.one_prompt and isinstance(body["prompt"], list) and len(body["prompt"]) != 1:
                return jsonify({"error": {"message": "only one prompt per request is supported"}}), 400
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            choices = []
            usage = 0
            for pi, prompt in enumerate(prompts):
                for _ in range(int(body.get("n", 1))):
                    choice, used = self._complete(prompt, body)
                    choice["index"] = len(choices)
                    choice["prompt_index"] = pi
                    choices.append(choice)
                    usage += used
            return jsonify({"id": "cmpl", "object": "text_completion", "model": self.model_name, "choices": choices,
                            "usage": {"total_tokens": usage}})

        @app.post("/v1/chat/completions")
        def chat():
            body = guard()
            if not isinstance(body, dict):
                return body
            prompt = self.tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
            choices, usage = [], 0
            for i in range(int(body.get("n", 1))):
                c, used = self._chat(prompt, body)
                c["index"] = i
                choices.append(c)
                usage += used
            return jsonify({"id": "chat", "object": "chat.completion", "model": self.model_name, "choices": choices,
                            "usage": {"total_tokens": usage}})

        self.app = app
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.port = self._server.server_port
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    # -- model helpers -------------------------------------------------------------------------------
    def fail_next(self, k: int, status: int = 500) -> None:
        with self._lock:
            self._fail.extend([status] * k)

    def _logprobs(self, ids: list[int]):
        import torch

        with self._model_lock, torch.inference_mode():
            logits = self.lm(input_ids=torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    def _generate(self, ids: list[int], body: dict[str, Any]) -> list[int]:
        import torch

        max_tokens = int(body.get("max_tokens", 16))
        temp = float(body.get("temperature", 1.0))
        top_p = float(body.get("top_p", 1.0))
        out: list[int] = []
        for _ in range(max_tokens):
            lp = self._logprobs(ids + out)[-1]
            if temp <= 0:
                t = int(lp.argmax())
            else:
                p = torch.softmax(lp / temp, -1)
                sp, si = torch.sort(p, descending=True)
                keep = (sp.cumsum(0) - sp) < top_p
                sp = sp * keep
                t = int(si[torch.multinomial(sp / sp.sum(), 1)])
            out.append(t)
            if t == self.tok.eos_token_id:
                break
        return out

    def _top(self, lp_row, k: int) -> dict[str, float]:
        import torch

        vals, idx = torch.topk(lp_row, k)
        return {self.tok.decode([int(i)]): float(v) for v, i in zip(vals, idx, strict=True)}

    def _complete(self, prompt: str, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        enc = self.tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        gen = self._generate(ids, body) if int(body.get("max_tokens", 16)) > 0 else []
        text = self.tok.decode(gen)
        choice: dict[str, Any] = {"text": (prompt + text) if body.get("echo") else text, "finish_reason": "length"}
        n_lp = None if self.no_logprobs else body.get("logprobs")
        if n_lp is not None:
            n_lp = int(n_lp)
            all_ids = ids + gen
            lp = self._logprobs(all_ids)
            tokens, token_lps, tops, offsets = [], [], [], []
            start = 0 if body.get("echo") else len(ids)
            offs = [o[0] for o in enc["offset_mapping"]]
            pos_text = len(prompt)
            for p in range(start, len(all_ids)):
                tok_s = self.tok.decode([all_ids[p]])
                tokens.append(tok_s)
                if self.echo_shift and body.get("echo") and p < len(ids):  # the next position's logprob
                    token_lps.append(float(lp[p, all_ids[p + 1]]) if p + 1 < len(all_ids) else None)
                else:
                    token_lps.append(None if p == 0 else float(lp[p - 1, all_ids[p]]))
                tops.append(None if p == 0 else (self._top(lp[p - 1], n_lp) if n_lp > 0 else {}))
                if p < len(ids):
                    offsets.append(offs[p])
                else:
                    offsets.append(pos_text)
                    pos_text += len(tok_s)
            choice["logprobs"] = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
        return choice, len(ids) + len(gen)

    def _chat(self, prompt: str, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        ids = list(self.tok(prompt, add_special_tokens=False)["input_ids"])
        gen = self._generate(ids, body)
        choice: dict[str, Any] = {
            "message": {"role": "assistant", "content": self.tok.decode(gen, skip_special_tokens=True)},
            "finish_reason": "length",
        }
        if body.get("logprobs") and not self.no_logprobs:
            k = int(body.get("top_logprobs", 0))
            lp = self._logprobs(ids + gen)
            content = []
            for j, t in enumerate(gen):
                row = lp[len(ids) + j - 1]
                content.append({
                    "token": self.tok.decode([t]), "logprob": float(row[t]),
                    "top_logprobs": [{"token": s, "logprob": v} for s, v in self._top(row, k).items()] if k else [],
                })
            choice["logprobs"] = {"content": content}
        return choice, len(ids) + len(gen)

    def close(self) -> None:
        """Stop serving; wait (up to 10 s) for requests still being answered, so no thread dies mid-forward."""
        self._server.shutdown()
        self._thread.join(5)
        end = time.time() + 10
        while self.active > 0 and time.time() < end:
            time.sleep(0.05)

    def __enter__(self) -> TinyLMServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
