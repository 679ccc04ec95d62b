"""pack_step: the padded layout every forward call relies on."""

import numpy as np
import pytest

from aotlm.errors import NoBucketError
from aotlm.runtime.generation.batch import ChunkInput, pack_step

PAGE = 4


def test_two_chunks_layout_slots_and_rows():
    a = ChunkInput(token_ids=[5, 6, 7, 8, 9], start=0, block_table=[3, 7], samples=True, seed=11)
    b = ChunkInput(
        token_ids=[42], start=6, block_table=[2, 5], samples=True, temperature=0.5, step=3,
        want_logprobs=True,
    )  # fmt: skip
    s = pack_step(
        [a, b], token_ladder=(4, 8, 16), request_ladder=(1, 2, 4), pages_per_seq=3, page_size=PAGE
    )
    tokens, positions, slots, token_req, tables = s.forward
    assert s.tokens == 8 and s.requests == 2 and s.real_tokens == 6
    assert tokens.tolist() == [5, 6, 7, 8, 9, 42, 0, 0]
    assert positions.tolist() == [0, 1, 2, 3, 4, 6, 0, 0]
    # a: pos 0-3 in page 3, pos 4 in page 7; b: pos 6 -> page 5, offset 2; padding -> trash page 0
    assert slots.tolist() == [12, 13, 14, 15, 28, 22, 0, 0]
    assert token_req.tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    assert (
        tables.shape == (4, 3)
        and tables[0].tolist() == [3, 7, 0]
        and tables[1].tolist() == [2, 5, 0]
    )
    assert s.rows.tolist() == [4, 5]
    x = s.sampling
    assert x.temperature.tolist() == [0.0, 0.5]
    assert x.seed.dtype == np.uint32 and x.seed.tolist() == [11, 0]
    assert x.step.tolist() == [0, 3] and x.top_p.tolist() == [1.0, 1.0]
    want = x.want_logprobs  # only b asked for logprobs
    assert want.tolist() == [0, 1] and want.dtype == np.int32


def test_prefill_chunk_that_does_not_sample_pads_request_rows():
    a = ChunkInput(token_ids=[1, 2, 3], start=0, block_table=[1], samples=False)
    b = ChunkInput(token_ids=[4], start=2, block_table=[2], samples=True, top_p=0.9)
    c = ChunkInput(token_ids=[5], start=2, block_table=[3], samples=True)
    s = pack_step([a, b, c], (8,), (1, 4), pages_per_seq=1, page_size=PAGE)
    assert s.sample_chunks == (1, 2) and s.requests == 4
    assert s.rows.tolist() == [3, 4, 0, 0]
    assert s.sampling.top_p.tolist() == pytest.approx([0.9, 1.0, 1.0, 1.0])


def test_too_many_tokens_is_a_typed_error():
    a = ChunkInput(token_ids=list(range(9)), start=0, block_table=[1, 2, 3], samples=True)
    with pytest.raises(NoBucketError):
        pack_step([a], (4, 8), (1,), pages_per_seq=3, page_size=PAGE)


def test_penalties_are_packed_only_when_a_row_needs_them():
    plain = ChunkInput(token_ids=[4], start=2, block_table=[2], samples=True)
    s = pack_step([plain], (8,), (1, 4), pages_per_seq=1, page_size=PAGE, max_seq_len=6)
    assert s.penalties is None
    pen = ChunkInput(
        token_ids=[9], start=3, block_table=[1], samples=True, frequency_penalty=0.5,
        history=[7, 8, 3, 9], prompt_len=3,
    )  # fmt: skip
    s = pack_step([plain, pen], (8,), (1, 4), pages_per_seq=1, page_size=PAGE, max_seq_len=6)
    p = s.penalties
    assert p.history.shape == (4, 6) and p.history[1].tolist() == [7, 8, 3, 9, -1, -1]
    assert (p.history[[0, 2, 3]] == -1).all()  # no history: nothing penalized
    assert p.prompt_len.tolist() == [0, 3, 0, 0] and p.frequency_penalty.tolist() == [0, 0.5, 0, 0]
    assert p.presence_penalty.tolist() == [0] * 4 and p.repetition_penalty.tolist() == [1] * 4


def test_a_seed_beyond_32_bits_is_taken_modulo_and_a_long_history_is_refused():
    big = ChunkInput(token_ids=[1], start=0, block_table=[1], samples=True, seed=2**40 + 5)
    s = pack_step([big], (8,), (1,), pages_per_seq=1, page_size=PAGE)
    assert s.sampling.seed.tolist() == [5]
    pen = ChunkInput(
        token_ids=[1], start=6, block_table=[1, 2], samples=True, repetition_penalty=1.2,
        history=list(range(7)),
    )  # fmt: skip
    with pytest.raises(ValueError, match="history: 7 values exceed max_seq_len=6"):
        pack_step([pen], (8,), (1,), pages_per_seq=2, page_size=PAGE, max_seq_len=6)
