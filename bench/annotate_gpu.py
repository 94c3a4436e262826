"""LLM scoring throughput against the roofline (issue 14): molal's ``hf`` annotator on a randomly initialised
Llama-3.1-8B-shaped causal LM in bf16 on a GPU, next to the naive loop MoLLIA's labelling script runs.

    python bench/annotate_gpu.py --device cuda --shape llama-8b --n 2000 --batch-sizes 8,32,64,128 --json-out out.json
    python bench/annotate_gpu.py --device cpu --shape tiny --n 16 --batch-sizes 4        # CPU smoke test (seconds)

No weights are downloaded and accuracy is not the point: the model is built from a config with random
weights (``--shape``), the tokenizer is a byte-level BPE trained here on the TREC questions and prompts (so
prompts have realistic lengths; its ids are a subset of the model's vocabulary). Prompt: the ``trec``
preset (plain, ``Category:``), 6 classes.

Measured, per scoring mode (``first_token``: one forward pass per batch, last position's logits only;
``full``: whole-label log-probabilities with the prompt's KV cache reused for the 6 labels, the verbalizers
made multi-token on purpose) and batch size: texts/s, tokens/s (prompt + label tokens run through the
model), peak GPU memory, and the share of the roofline. The roofline is the card's bf16 matmul rate,
measured in the same run (a large square matmul), against the FLOPs the scoring needs: 2 x (non-embedding
parameters except the output head) x tokens + 2 x (output head) x positions whose logits are used. The
issue's simpler bound, 2 x parameters x prompt tokens, is reported beside it.

The naive baseline does what MoLLIA's ``labelGen.py: get_llm_logit`` does: one text per forward pass
(batch 1), logits at every position, softmax of the last, top-100 tokens decoded one by one and merged into
the labels by substring. ``naive_ratio`` = molal's texts/s / the naive loop's texts/s, same texts.
Prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES: dict[str, dict] = {
    # Llama-3.1-8B's architecture (config.json of meta-llama/Llama-3.1-8B), random weights
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "tiny": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False),
}
CLASSES = ["abbreviation", "description", "entity", "human", "location", "numeric"]
#: multi-token answers for the full-label mode (the first words stay distinct)
LONG = {"abbreviation": "abbreviation or acronym", "description": "description or definition",
        "entity": "entity or thing", "human": "human being or group", "location": "location or place",
        "numeric": "numeric value or date"}


def trec_texts(n: int) -> list[str]:
    from molal.resources import asset_path

    rows = [json.loads(x) for x in asset_path("trec.jsonl").read_text().splitlines() if x.strip()]
    texts = [r["text"] for r in rows]
    return (texts * (n // len(texts) + 1))[:n]


def build_tokenizer(path: Path, vocab: int) -> object:
    """A byte-level BPE trained on the TREC questions and the prompt (a stand-in for the real tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from molal.annotators.prompts import Prompt

    p = Prompt.build(preset="trec")
    corpus = [p.plain(t, CLASSES) for t in trec_texts(3000)] + [" ".join(LONG.values())] * 50
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=min(vocab, 16000), special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.padding_side = "left"
    tok.save_pretrained(path)
    return tok


def build_model(shape: str, dev: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            lm = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return lm.eval()


def param_counts(lm) -> dict[str, int]:
    emb = lm.model.embed_tokens.weight.numel()
    head = lm.lm_head.weight.numel()
    total = sum(p.numel() for p in lm.parameters())
    if lm.config.tie_word_embeddings:
        total += head  # the tied head still multiplies
    return {"total": total, "embedding": emb, "head": head, "body": total - emb - head}


def sync(dev: str) -> None:
    import torch

    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(dev: str, dtype, size: int, reps: int = 20) -> float:
    """FLOP/s of a square matmul (the card's practical bf16 peak)."""
    import torch

    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * size**3 * reps / (time.perf_counter() - t)


def peak_mem_reset(dev: str) -> None:
    import torch

    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_mem_gb(dev: str) -> float:
    import torch

    if dev.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def molal_annotator(tok, lm, dev: str, mode: str, batch: int):
    from molal.annotators.hf import HFAnnotator

    verb = LONG if mode == "full" else None
    a = HFAnnotator("bench", "(in memory)", preset="trec", chat=False, scoring=mode, batch_size=batch, verbalizers=verb,
                    max_length=512)
    a._tok, a._lm, a._dev = tok, lm, dev  # the model is built in memory: skip loading from a folder
    return a


def naive_loop(tok, lm, dev: str, texts: list[str]) -> float:
    """MoLLIA's get_llm_logit per text; returns the seconds."""
    import torch
    import torch.nn.functional as F

    from molal.annotators.prompts import Prompt

    p = Prompt.build(preset="trec")
    sync(dev)
    t = time.perf_counter()
    for text in texts:
        ids = tok(p.plain(text, CLASSES), return_tensors="pt")["input_ids"].to(dev)
        with torch.no_grad():
            logits = lm(ids).logits
        probs = F.softmax(logits[0, -1].float(), dim=-1)
        top_p, top_i = torch.topk(probs, k=100)
        tokens = [tok.decode([int(i)]) for i in top_i]
        out = [0.0] * len(CLASSES)
        for token, pr in zip(tokens, top_p, strict=True):
            for k, label in enumerate(CLASSES):
                if token.lower() in label or label in token.lower():
                    out[k] += pr.item()
    sync(dev)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    ap.add_argument("--n", type=int, default=2000, help="texts per measurement")
    ap.add_argument("--naive-n", type=int, default=None, help="texts for the naive loop (default: --n, at most 500)")
    ap.add_argument("--batch-sizes", default="8,32,64,128")
    ap.add_argument("--modes", default="first_token,full")
    ap.add_argument("--matmul-size", type=int, default=None, help="default 8192 on a GPU, 512 on a CPU")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    dev = args.device
    gpu = dev.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu --shape tiny for the smoke test")
    dtype = torch.bfloat16 if gpu else torch.float32
    card = torch.cuda.get_device_name(0) if gpu else f"CPU ({os.cpu_count()} cores)"
    texts = trec_texts(args.n)
    tmp = Path(tempfile.mkdtemp(prefix="molal-gpu-bench-"))
    tok = build_tokenizer(tmp / "tok", SHAPES[args.shape]["vocab_size"])
    t0 = time.perf_counter()
    lm = build_model(args.shape, dev, dtype)
    build_s = time.perf_counter() - t0
    pc = param_counts(lm)
    rate = matmul_rate(dev, dtype, args.matmul_size or (8192 if gpu else 512))
    meta = {"device": card, "shape": args.shape, "dtype": str(dtype).replace("torch.", ""), "params": pc,
            "matmul_tflops": round(rate / 1e12, 2), "n": len(texts), "build_s": round(build_s, 1),
            "torch": torch.__version__}
    results = []
    for mode in args.modes.split(","):
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            a = molal_annotator(tok, lm, dev, mode, bs)
            a.annotate(texts[: min(len(texts), 2 * bs)], CLASSES)  # warm-up (kernels, allocator)
            peak_mem_reset(dev)
            sync(dev)
            t = time.perf_counter()
            res = a.annotate(texts, CLASSES)
            sync(dev)
            secs = time.perf_counter() - t
            prompt_tok = sum(len(a.prompt_ids(x, CLASSES, {})) for x in texts)
            labels = a.label_ids(CLASSES)
            label_tok = len(texts) * sum(len(x) - 1 for x in labels) if mode == "full" else 0
            head_pos = len(texts) * (1 + (sum(len(x) - 1 for x in labels) if mode == "full" else 0))
            need = 2 * pc["body"] * (prompt_tok + label_tok) + 2 * pc["head"] * head_pos
            simple = 2 * pc["total"] * prompt_tok
            results.append({
                "mode": mode, "batch": bs, "seconds": round(secs, 3), "texts_per_s": round(len(texts) / secs, 1),
                "tokens_per_s": round((prompt_tok + label_tok) / secs, 0), "prompt_tokens": prompt_tok,
                "label_tokens": label_tok, "tokens_reported": res.tokens, "peak_mem_gb": peak_mem_gb(dev),
                "roofline_share": round(need / secs / rate, 3), "roofline_share_2NP": round(simple / secs / rate, 3),
            })
            print(json.dumps(results[-1]), file=sys.stderr)
    naive_n = min(len(texts), args.naive_n or 500)
    naive_s = naive_loop(tok, lm, dev, texts[:naive_n])
    naive_tps = naive_n / naive_s
    meta["naive"] = {"n": naive_n, "seconds": round(naive_s, 2), "texts_per_s": round(naive_tps, 1)}
    for r in results:
        r["naive_ratio"] = round(r["texts_per_s"] / naive_tps, 2)
    doc = {"meta": meta, "results": results}
    print(json.dumps(doc, indent=1))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(doc, indent=1))
    print(f"\n{card}, {args.shape} ({pc['total'] / 1e9:.2f} B parameters, {meta['dtype']}), matmul "
          f"{meta['matmul_tflops']} TFLOP/s; naive loop (MoLLIA, batch 1) {naive_tps:.1f} texts/s")
    print("| mode | batch | texts/s | tokens/s | peak mem GB | roofline share | 2NP share | x naive |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['mode']} | {r['batch']} | {r['texts_per_s']} | {r['tokens_per_s']:.0f} | {r['peak_mem_gb']} | "
              f"{r['roofline_share']:.1%} | {r['roofline_share_2NP']:.1%} | {r['naive_ratio']} |")


if __name__ == "__main__":
    main()
