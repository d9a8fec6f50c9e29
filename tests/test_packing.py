"""Multi-sample packing: conservation of tokens, prompt masks, both modes."""

import random

import numpy as np
import pytest

import dllm

PAD = 0
EOS = 9


def _samples(n, seed=0, max_prompt=12, max_resp=20):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randint(10, 99) for _ in range(rng.randint(1, max_prompt))]
        resp = [rng.randint(100, 199) for _ in range(rng.randint(0, max_resp))] + [EOS]
        out.append((prompt, resp))
    return out


def test_concat_conserves_every_token_in_order_with_no_padding_but_the_last_row():
    samples = _samples(50)
    packed = dllm.pack_samples(samples, 64, mode="concat", pad_token_id=PAD)
    stream = np.concatenate([np.array(p + r) for p, r in samples])
    real = packed.input_ids[packed.segment_ids > 0]
    assert np.array_equal(real, stream)  # tokens in == tokens out, same order
    assert (packed.segment_ids[:-1] > 0).all()  # only the final row can hold padding
    assert packed.num_rows == -(-len(stream) // 64)


def test_concat_prompt_mask_marks_exactly_the_prompts():
    samples = _samples(30, seed=1)
    packed = dllm.pack_samples(samples, 50, mode="concat", pad_token_id=PAD)
    expected = np.concatenate([np.array([True] * len(p) + [False] * len(r)) for p, r in samples])
    assert np.array_equal(packed.prompt_mask[packed.segment_ids > 0], expected)


def test_concat_segments_restart_per_row_and_split_at_sample_ends():
    samples = [([1, 2], [3, EOS]), ([4], [5, 6, EOS]), ([7, 8, 8], [EOS])]
    packed = dllm.pack_samples(samples, 5, mode="concat", pad_token_id=PAD)
    assert packed.input_ids.tolist() == [[1, 2, 3, EOS, 4], [5, 6, EOS, 7, 8], [8, EOS, 0, 0, 0]]
    assert packed.segment_ids.tolist() == [[1, 1, 1, 1, 2], [1, 1, 1, 2, 2], [1, 1, 0, 0, 0]]


def test_no_split_keeps_each_sample_whole_in_one_row():
    samples = _samples(80, seed=2)
    packed = dllm.pack_samples(samples, 48, mode="no_split", pad_token_id=PAD)
    found = []
    for row in range(packed.num_rows):
        seg = packed.segment_ids[row]
        for s in range(1, seg.max() + 1):
            found.append(tuple(packed.input_ids[row][seg == s]))
    assert sorted(found) == sorted(tuple(p + r) for p, r in samples)
    assert packed.dropped == []


def test_no_split_reports_samples_longer_than_a_row_and_empty_ones():
    samples = [([1] * 10, [2] * 10), ([1], [EOS]), ([], []), ([3] * 3, [EOS])]
    packed = dllm.pack_samples(samples, 8, mode="no_split", pad_token_id=PAD)
    assert packed.dropped == [0, 2]
    assert packed.real_tokens == 2 + 4


def test_no_split_fills_rows_tightly_on_realistic_lengths():
    samples = _samples(2000, seed=3, max_prompt=60, max_resp=200)
    packed = dllm.pack_samples(samples, 1024, mode="no_split", pad_token_id=PAD)
    assert packed.efficiency >= 0.99


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="packing mode"):
        dllm.pack_samples([([1], [2])], 8, mode="zip", pad_token_id=PAD)
    with pytest.raises(ValueError, match="seq_len"):
        dllm.pack_samples([([1], [2])], 0, pad_token_id=PAD)


def test_concat_keep_tail_returns_full_rows_and_the_rest_as_pieces():
    samples = _samples(40, seed=4)
    part = dllm.pack_samples(samples, 64, mode="concat", pad_token_id=PAD, keep_tail=True)
    assert (part.segment_ids > 0).all()  # only full rows
    rest = dllm.pack_samples(part.tail, 64, mode="concat", pad_token_id=PAD)
    stream = np.concatenate([np.array(p + r) for p, r in samples])
    both = np.concatenate([part.input_ids[part.segment_ids > 0], rest.input_ids[rest.segment_ids > 0]])
    assert np.array_equal(both, stream)
    prompts = np.concatenate([part.prompt_mask[part.segment_ids > 0], rest.prompt_mask[rest.segment_ids > 0]])
    assert np.array_equal(prompts, np.concatenate([np.array([True] * len(p) + [False] * len(r)) for p, r in samples]))
