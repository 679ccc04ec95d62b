"""Baselines for benchmarks/serve.py, run on the same prompts as the served passes.

- `transformers_generator`: what a Hugging Face user would do: `model.generate` over static
  batches of `batch_size` prompts (left padding, attention mask), greedy, `max_new_tokens` = the
  largest request of the batch, EOS ignored; only each request's own `max_tokens` count as useful
  output. serve.py runs it in a worker process of its own (`python serve_baselines.py CHECKPOINT
  BATCH THREADS`, see `worker`), so no jax is loaded beside torch, and has it run each mixed pass
  right after the server ran the same pass: both sides of a ratio see the same machine load.
  PyTorch's OpenMP threads degrade badly when the cores are oversubscribed, so serve.py keeps a
  worker with 1 thread and one with a thread per core (torch's default) and counts the faster of
  the two per pass.
- `engine_offline`: aotlm's engine in this process with no HTTP, in the same closed loop as the
  served run (`concurrency` requests in flight), so the served numbers can be split into engine
  time and server/client overhead.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Request:
    """One load-generator request: prompt token ids and the exact number of tokens to generate."""

    prompt: list[int]
    max_tokens: int


def transformers_generator(
    checkpoint: Path, threads: int
) -> Callable[[Sequence[Request]], list[list[int]]]:
    """The checkpoint loaded with `threads` torch threads; returns greedy `model.generate` over one
    static batch (each request's own `max_tokens` tokens)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    pad_id = model.config.pad_token_id
    if pad_id is None:  # padded positions are masked out: any id will do
        pad_id = 0
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None  # the served requests use ignore_eos: generate exactly N tokens
    config.do_sample = False
    config.pad_token_id = pad_id

    def generate(batch: Sequence[Request]) -> list[list[int]]:
        width = max(len(r.prompt) for r in batch)
        ids = [[pad_id] * (width - len(r.prompt)) + r.prompt for r in batch]
        mask = [[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in batch]
        config.max_new_tokens = max(r.max_tokens for r in batch)
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.tensor(ids),
                attention_mask=torch.tensor(mask),
                generation_config=config,
            )
        return [out[i, width : width + r.max_tokens].tolist() for i, r in enumerate(batch)]

    return generate


def timed_pass(generate, requests: Sequence[Request], batch_size: int) -> dict:
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    token_ids: list[list[int]] = []
    start, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        token_ids.extend(generate(batch))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    useful = sum(r.max_tokens for r in requests)
    computed = sum(len(b) * max(r.max_tokens for r in b) for b in batches)
    return {
        "seconds": seconds,
        "cpu_s": cpu,  # every thread of this process
        "batches": len(batches),
        "useful_output_tokens": useful,
        "computed_output_tokens": computed,
        "output_tok_s": useful / seconds,
        "req_s": len(requests) / seconds,
        "token_ids": token_ids,
    }


class _TimedRunner:
    """Forwards to a `ModelRunner`, adding up the wall time of its device calls (pack + device +
    fetch) per token bucket, and of multi-step decode calls under "decode"."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.by_bucket: dict[int | str, list[float]] = {}

    def _timed(self, key: int | str, call):
        start = time.perf_counter()
        try:
            return call()
        finally:
            self.by_bucket.setdefault(key, []).append(time.perf_counter() - start)

    def execute(self, chunks):
        from aotlm.buckets import pick_bucket

        bucket = pick_bucket(self.runner.token_buckets, sum(len(c.token_ids) for c in chunks))
        return self._timed(bucket, lambda: self.runner.execute(chunks))

    def execute_decode(self, chunks, limits, num_steps):
        return self._timed("decode", lambda: self.runner.execute_decode(chunks, limits, num_steps))

    @property
    def seconds(self) -> float:
        return sum(sum(v) for v in self.by_bucket.values())


def closed_loop(engine, requests: Sequence[Request], concurrency: int) -> tuple[list, int]:
    """Run `requests` (greedy, exactly max_tokens each) with `concurrency` in flight, the next
    one added as soon as one finishes (between steps); returns (first sequence of each, steps)."""
    from aotlm.runtime.generation.sampling_params import SamplingParams

    todo = iter(requests)
    seqs = []

    def add_next() -> None:
        r = next(todo, None)
        if r is not None:
            params = SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
            seqs.append(engine.add_request(r.prompt, params)[0])

    for _ in range(concurrency):
        add_next()
    steps = 0
    while engine.scheduler.has_unfinished:
        for seq in engine.step():
            if seq.is_finished:
                add_next()
        steps += 1
    return seqs, steps


def engine_offline(
    bundle: Path, requests: Sequence[Request], warm: Sequence[Request], concurrency: int
) -> dict:
    """aotlm's engine without HTTP, in the served workload's closed loop: `concurrency` requests
    in flight, the next one added as soon as one finishes (between steps), stepped until done.

    `warm` runs first, untimed; give it prompts that share no page with `requests`.
    """
    import jax

    from aotlm.runtime.generation.engine import Engine

    engine = Engine.from_bundle(bundle)
    timed = _TimedRunner(engine.runner)
    engine.runner = timed  # instrument this benchmark's own engine only
    closed_loop(engine, warm, concurrency)
    timed.by_bucket.clear()
    start, cpu = time.perf_counter(), time.process_time()
    seqs, steps = closed_loop(engine, requests, concurrency)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = sum(r.max_tokens for r in requests)
    return {
        "seconds": seconds,
        "cpu_s": cpu,  # every thread of this process (XLA's included)
        "steps": steps,
        "step_ms": 1e3 * seconds / steps,
        "execute_ms": 1e3 * timed.seconds / steps,  # pack, device step(s), results to host
        "host_ms": 1e3 * (seconds - timed.seconds) / steps,  # schedule, postprocess, detokenize
        "execute_by_token_bucket": {
            str(b): {"steps": len(v), "ms": 1e3 * sum(v) / len(v), "share": sum(v) / seconds}
            for b, v in sorted(timed.by_bucket.items(), key=lambda kv: str(kv[0]).zfill(8))
        },
        "output_tok_s": tokens / seconds,
        "req_s": len(requests) / seconds,
        "compiles_after_ready": engine.compiles_after_ready,
        "backend": jax.default_backend(),
        "token_ids": [list(s.output_token_ids) for s in seqs],
        "texts": [engine.text(s) for s in seqs],
    }


def worker(checkpoint: Path, batch_size: int, threads: int) -> None:
    """The transformers baseline as a process serve.py drives: each stdin line is a JSON list of
    requests ({"prompt", "max_tokens"}); the first is run untimed (warm-up) and answered with
    {"ready": true}, every other one is a timed pass answered with `timed_pass`'s JSON line."""
    generate = transformers_generator(checkpoint, threads)
    for n, line in enumerate(sys.stdin):
        requests = [Request(r["prompt"], r["max_tokens"]) for r in json.loads(line)]
        if n == 0:
            generate(requests[:batch_size])
            result: dict = {"ready": True}
        else:
            result = timed_pass(generate, requests, batch_size)
        print(json.dumps(result), flush=True)


def main(argv: Sequence[str]) -> None:
    checkpoint, batch_size, threads = argv
    worker(Path(checkpoint), int(batch_size), int(threads))


if __name__ == "__main__":
    main(sys.argv[1:])
