"""Multi-sample packing: conservation of tokens, prompt masks, both modes."""

import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

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


def test_eos_padding_follows_a_response_with_0_to_n_eos_drawn_from_the_samples_name():
    response = [5, 6, EOS]
    keys = [f"data.jsonl:{line}" for line in range(1, 501)]
    padded = [dllm.eos_padded(response, EOS, 8, key=k) for k in keys]
    assert all(p[:3] == response and set(p[3:]) <= {EOS} for p in padded)
    extra = [len(p) - len(response) for p in padded]
    assert set(extra) == set(range(9))  # every count from 0 to 8 occurs
    assert 3.5 < statistics.mean(extra) < 4.5  # U[0, 8]
    assert [dllm.eos_padded(response, EOS, 8, key=k) for k in keys] == padded  # same name, same padding
    assert dllm.eos_padded(response, EOS, 0, key=keys[0]) == response
    assert max(len(dllm.eos_padded(response, EOS, 8, key=k, room=2)) for k in keys) == 5  # never more than room
    assert dllm.eos_padded(response, EOS, 8, key=keys[0], room=-3) == response
    with pytest.raises(ValueError, match="max_extra"):
        dllm.eos_padded(response, EOS, -1, key=keys[0])


def test_eos_padding_is_the_same_in_another_process_with_another_hash_seed():
    """Ray workers are separate processes; Python's str hash is salted per process, the draw is not."""
    code = "import dllm; print([len(dllm.eos_padded([], 9, 8, key=f'data.jsonl:{i}')) for i in range(40)])"
    here = [len(dllm.eos_padded([], EOS, 8, key=f"data.jsonl:{i}")) for i in range(40)]
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, cwd=Path(__file__).parents[1])
        assert out.stdout.strip() == str(here)
