"""Benchmark of the annotate stage: texts/s of each CPU-runnable backend, and cache hit vs miss speed.

    .venv/bin/python bench/annotate.py [--n 200] [--threads 1] [--json-out results.json]

Backends: embedding zero-shot (bundled all-MiniLM-L6-v2), HF transformers (tiny random Llama built on the
fly, full-label and first-token scoring), OpenAI-compatible HTTP (the local test server backed by the same
tiny model: completions+echo and chat+top_logprobs), replay (bundled TREC recording). Texts: TREC train
questions (molal/assets/trec.jsonl), 6 classes. Cache: reading n annotations back from the SQLite cache
(a hit) vs annotating them (a miss). Prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="texts per backend")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from molal.annotators import Mixture
    from molal.annotators.embedding import EmbeddingAnnotator
    from molal.annotators.hf import HFAnnotator
    from molal.annotators.openai_compat import OpenAIAnnotator
    from molal.annotators.replay import ReplayAnnotator
    from molal.cache import AnnotationCache
    from molal.resources import asset_path
    from tests.llm_server import TinyLMServer, build_tiny_lm

    rows = [json.loads(line) for line in asset_path("trec.jsonl").read_text().splitlines()]
    from molal.datasets import CLASS_NAMES

    classes = list(CLASS_NAMES["trec"])
    texts = [r["text"] for r in rows[: args.n]]
    gold = [classes.index(r["label"]) for r in rows[: args.n]]
    tmp = Path(tempfile.mkdtemp(prefix="molal-bench-"))
    tiny = build_tiny_lm(tmp / "tiny", seed=0)
    results: dict[str, dict] = {}

    def run(key: str, annotator, n: int | None = None, warm: bool = True) -> None:
        ts = texts[: n or len(texts)]
        if warm:
            annotator.annotate(ts[:2], classes)  # load the model / open connections
        secs, res = timed(lambda: annotator.annotate(ts, classes))
        acc = float((res.probs.argmax(1) == gold[: len(ts)]).mean()) if not res.failed else None
        results[key] = {
            "texts": len(ts), "seconds": secs, "texts_per_s": len(ts) / secs,
            "ms_per_text": 1000 * secs / len(ts), "tokens_per_s": (res.tokens / secs) if res.tokens else None,
            "failed": len(res.failed), "accuracy": acc,
        }
        print(f"  {key}: {len(ts) / secs:.1f} texts/s", file=sys.stderr)

    print("benchmarking ...", file=sys.stderr)
    run("replay (bundled TREC)", ReplayAnnotator("qwen"))
    run("embedding (MiniLM, 1 template)", EmbeddingAnnotator("e", templates=["This question is about {label}."]))
    run("embedding (MiniLM, 2 templates, 4 MC-dropout samples)", EmbeddingAnnotator("e2", templates=["{label}", "About {label}."], samples=4))
    run("hf tiny Llama (full-label, prompt KV reused)", HFAnnotator("h", str(tiny), scoring="full", batch_size=16))
    run("hf tiny Llama (full-label, every prompt+label run)", HFAnnotator("h0", str(tiny), scoring="full", batch_size=16,
                                                                      reuse_prompt_cache=False))
    run("hf tiny Llama (first-token)", HFAnnotator("h1", str(tiny), scoring="first_token", batch_size=16))
    with TinyLMServer(tiny) as srv:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        n_http = min(args.n, 100)
        run("openai HTTP completions+echo (tiny Llama server)", OpenAIAnnotator("o", srv.base_url, "tiny-llama", api="completions", concurrency=4), n_http)
        run("openai HTTP chat+top_logprobs (tiny Llama server)", OpenAIAnnotator("c", srv.base_url, "tiny-llama", api="chat", top_logprobs=50, concurrency=4), n_http)

    # cache: hit vs miss (a Mixture of one embedding annotator, the cheapest model backend)
    cache = AnnotationCache(tmp / "cache.sqlite")
    mix = Mixture([EmbeddingAnnotator("e", templates=["This question is about {label}."])])
    mix.annotate(texts[:2], classes)  # warm the model (not cached: no cache passed)
    miss_s, r1 = timed(lambda: mix.annotate(texts, classes, cache=cache))
    assert r1.stats["cache_misses"] == len(texts)
    hit_s, r2 = timed(lambda: mix.annotate(texts, classes, cache=cache), repeat=3)
    assert r2.stats["cache_hits"] == len(texts) and r2.stats["annotated"] == 0
    raw_hit_s, _ = timed(lambda: cache.get_many(mix.cache_identity(mix.annotators[0], classes, {}), texts), repeat=3)
    replay_mix = Mixture([ReplayAnnotator("qwen")])
    replay_s, _ = timed(lambda: replay_mix.annotate(texts, classes), repeat=3)
    results["cache"] = {
        "texts": len(texts),
        "miss_ms_per_text (embedding, incl. cache write)": 1000 * miss_s / len(texts),
        "hit_ms_per_text (Mixture.annotate)": 1000 * hit_s / len(texts),
        "hit_ms_per_text (AnnotationCache.get_many)": 1000 * raw_hit_s / len(texts),
        "replay_ms_per_text (Mixture.annotate, no cache)": 1000 * replay_s / len(texts),
        "speedup_hit_vs_embedding_miss": miss_s / hit_s,
    }
    fastest = min((v["ms_per_text"], k) for k, v in results.items() if k != "cache" and not k.startswith("replay"))
    results["cache"]["fastest_model_backend"] = fastest[1]
    results["cache"]["speedup_hit_vs_fastest_model_backend"] = fastest[0] / results["cache"]["hit_ms_per_text (Mixture.annotate)"]
    meta = {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
            "machine": platform.machine(), "cpus": __import__("os").cpu_count(), "n": args.n}
    out = {"meta": meta, "results": results}
    print(json.dumps(out, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2))

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"annotate backends (CPU, {args.threads} torch thread(s), TREC, 6 classes)")
    for col in ("backend", "texts", "texts/s", "ms/text", "tokens/s", "acc"):
        t.add_column(col, justify="left" if col == "backend" else "right")
    for k, v in results.items():
        if k == "cache":
            continue
        t.add_row(k, str(v["texts"]), f"{v['texts_per_s']:.1f}", f"{v['ms_per_text']:.2f}",
                  f"{v['tokens_per_s']:.0f}" if v["tokens_per_s"] else "-", f"{v['accuracy']:.3f}" if v["accuracy"] is not None else "-")
    c = Table(title="annotation cache")
    c.add_column("measure")
    c.add_column("value", justify="right")
    for k, v in results["cache"].items():
        c.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    con = Console()
    con.print(t)
    con.print(c)


if __name__ == "__main__":
    main()
