"""A format-3 bundle's samplers take 7 inputs (no want_logprobs) and always compute logprobs: the
runner asks each executable what it takes, so such a bundle serves as it was built."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from aotlm.kernels.sampling import sample
from aotlm.runtime.generation.engine import Engine
from aotlm.runtime.generation.sampling_params import SamplingParams
from aotlm.runtime.load.loader import load_bundle

PROMPT = "The cat sat on the mat"


def test_samplers_without_the_logprobs_switch_still_run(tiny_bundle):
    loaded = load_bundle(tiny_bundle[0])  # not sealed yet: the old samplers compile first
    old = dict(loaded.executables)
    for r in loaded.request_buckets:
        f, i = np.zeros(r, np.float32), np.zeros(r, np.int32)
        args = (np.zeros((r, loaded.model.vocab_size), np.float32), f, i, f, f)
        args += (np.zeros(r, np.uint32), i)  # seed, step; no want_logprobs
        old[("sample", (r,))] = jax.jit(sample).lower(*args).compile()
    loaded.counter.seal()
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    new = Engine(loaded, strict=True)
    want = new.generate([PROMPT], params)[0][0]
    assert new.runner.want_column and not any(want.logprobs)  # nobody asked: not computed
    kv = {k: jax.device_put(np.zeros(loaded.k_pages.shape, loaded.k_pages.dtype)) for k in "kv"}
    old_loaded = dataclasses.replace(loaded, executables=old, k_pages=kv["k"], v_pages=kv["v"])
    old_engine = Engine(old_loaded, strict=True, decode_steps=1)  # format 3 had no decode[R]
    assert not old_engine.runner.want_column
    got = old_engine.generate([PROMPT], params)[0][0]
    assert got.token_ids == want.token_ids
    assert all(lp < 0 for lp in got.logprobs)  # the old samplers always compute them
    assert old_engine.compiles_after_ready == 0
    loaded.counter.close()
