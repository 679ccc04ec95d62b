"""Multi-step decode (decode[R], model.yaml decode_steps): the same tokens as one step per call.

The shared tiny bundle is built with decode_steps: 4; an engine limited to 1 step per call on the
same bundle is the reference. Greedy and seeded outputs must be token-identical, stops must cut
at the same token, and the multi-step path must actually have run.
"""

from __future__ import annotations

import numpy as np
import pytest

from aotlm.errors import BundleError
from aotlm.runtime.generation.engine import Engine
from aotlm.runtime.generation.sampling_params import SamplingParams

PROMPTS = ["The cat sat on the mat", "A dog", "Once upon a time, in a land far away, there lived"]


@pytest.fixture(scope="module")
def engines(tiny_bundle):
    """(multi-step engine, one-step engine) on the same bundle."""
    path = tiny_bundle[0]
    return Engine.from_bundle(path, strict=True), Engine.from_bundle(
        path, strict=True, decode_steps=1
    )


def decode_calls(engine: Engine) -> int:
    return sum(n for (name, _), n in engine.runner.bucket_calls.items() if name == "decode")


def run(engine: Engine, params: SamplingParams, prompts=PROMPTS):
    return [
        [(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in r]
        for r in engine.generate(prompts, params)
    ]


def test_the_bundle_records_its_decode_steps(engines):
    multi, single = engines
    assert multi.decode_steps == 4 and single.decode_steps == 1
    assert multi.loaded.manifest.serving.decode_steps == 4


@pytest.mark.parametrize("max_tokens", [1, 2, 7, 30])
def test_greedy_tokens_equal_one_step_per_call(engines, max_tokens):
    multi, single = engines
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    before = decode_calls(multi)
    got, want = run(multi, params), run(single, params)
    assert [[x[:3] for x in r] for r in got] == [[x[:3] for x in r] for r in want]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g[0][3], w[0][3], rtol=1e-4, atol=1e-5)
    if max_tokens >= 7:
        assert decode_calls(multi) > before, "the multi-step path did not run"
    assert decode_calls(single) == 0
    assert multi.compiles_after_ready == single.compiles_after_ready == 0
    assert multi.block_manager.num_used_pages == 0


def test_seeded_sampling_and_n_choices_are_reproduced(engines):
    multi, single = engines
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=11, n=2, max_tokens=21)
    got, want = run(multi, params), run(single, params)
    assert [[x[0] for x in r] for r in got] == [[x[0] for x in r] for r in want]
    assert got[0][0][0] != got[0][1][0], "two choices of one seeded request should differ"


def test_stops_cut_at_the_same_token(engines):
    multi, single = engines
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    text = single.generate([PROMPTS[0]], greedy)[0][0].text
    stop = text[len(text) // 3 : len(text) // 3 + 3]  # a stop string in the middle of a burst
    ids = single.generate([PROMPTS[0]], greedy)[0][0].token_ids
    for params in (
        SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=(stop,)),
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=(ids[9],)),
    ):
        got, want = run(multi, params, PROMPTS[:1]), run(single, params, PROMPTS[:1])
        assert got[0][0][:3] == want[0][0][:3]  # token ids, text, finish reason
        assert got[0][0][2] == "stop" and len(got[0][0][0]) < 30


def test_logprobs_come_back_for_every_token(engines):
    multi, single = engines
    params = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=3)
    a = multi.generate(PROMPTS[:1], params)[0][0]
    b = single.generate(PROMPTS[:1], params)[0][0]
    assert a.token_ids == b.token_ids and len(a.logprobs) == 9
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-4, atol=1e-5)


def test_more_steps_than_the_bundle_has_is_refused(tiny_bundle):
    with pytest.raises(BundleError, match=r"decode_steps=5.*1\.\.4"):
        Engine.from_bundle(tiny_bundle[0], decode_steps=5)


def test_serve_refuses_more_steps_before_loading(tiny_bundle):
    from click.testing import CliRunner

    from aotlm.cli import main

    result = CliRunner().invoke(main, ["serve", str(tiny_bundle[0]), "--decode-steps", "9"])
    assert result.exit_code != 0
    assert "decode_steps=9, but this bundle runs 1..4 decode steps per call" in result.output
