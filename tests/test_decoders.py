"""Each decoder's commit rule on hand-made confidences and logits."""

import torch

from dllm.engine import decoders

T = torch.tensor


def test_threshold_commits_all_above_tau_and_always_the_top1():
    conf = T([[0.95, 0.2, 0.91, 0.5], [0.3, 0.4, 0.1, 0.2]])
    masked = T([[True, True, True, False], [True, True, True, True]])
    out = decoders.threshold_commit(conf, masked, T([0.9, 0.9]))
    assert out.tolist() == [[True, False, True, False], [False, True, False, False]]


def test_threshold_never_commits_unmasked_positions_and_nothing_when_block_is_done():
    conf = T([[0.99, 0.99]])
    assert decoders.threshold_commit(conf, T([[False, False]]), T([0.5])).tolist() == [[False, False]]


def test_factor_rule_commits_largest_n_with_n_plus_1_times_error_below_f():
    # sorted confidences 0.99, 0.9, 0.8, 0.3 -> (n+1)(1-c_n) = 0.02, 0.3, 0.8, 3.5
    conf = T([[0.8, 0.99, 0.3, 0.9]])
    masked = torch.ones(1, 4, dtype=torch.bool)
    assert decoders.factor_commit(conf, masked, T([0.5])).tolist() == [[False, True, False, True]]
    assert decoders.factor_commit(conf, masked, T([1.0])).tolist() == [[True, True, False, True]]
    assert decoders.factor_commit(conf, masked, T([0.01])).tolist() == [[False, True, False, False]]  # top-1


def test_top_k_commits_the_k_most_confident_masked_positions():
    conf = T([[0.1, 0.9, 0.5, 0.7], [0.1, 0.9, 0.5, 0.7]])
    masked = T([[True, True, True, True], [True, False, True, True]])
    out = decoders.top_k_commit(conf, masked, T([2, 2]))
    assert out.tolist() == [[False, True, False, True], [False, False, True, True]]


def test_hierarchical_picks_best_of_each_mask_run_above_low_plus_all_above_high():
    # runs of masks: [0,1], [3,4,5]; position 2 and 6 are decided
    conf = T([[0.7, 0.5, 0.0, 0.3, 0.65, 0.62, 0.0]])
    masked = T([[True, True, False, True, True, True, False]])
    out = decoders.hierarchical_commit(conf, masked, high=T([0.95]), low=T([0.6]))
    assert out.tolist() == [[True, False, False, False, True, False, False]]
    out = decoders.hierarchical_commit(conf, masked, high=T([0.6]), low=T([0.6]))
    assert out.tolist() == [[True, False, False, False, True, True, False]]
    # nothing passes: still the global top-1
    out = decoders.hierarchical_commit(conf, masked, high=T([0.99]), low=T([0.99]))
    assert out.tolist() == [[True, False, False, False, False, False, False]]
    # a low threshold above the high one adds nothing: the threshold rule
    out = decoders.hierarchical_commit(conf, masked, high=T([0.6]), low=T([0.9]))
    assert out.tolist() == decoders.threshold_commit(conf, masked, T([0.6])).tolist()


def test_candidates_exclude_the_mask_token_and_report_softmax_confidence():
    logits = T([[[5.0, 0.0, 9.0], [0.0, 2.0, 0.0]]])
    x, conf = decoders.candidates(logits, mask_token_id=2)
    assert x.tolist() == [[0, 1]]
    assert torch.allclose(conf[0, 0], torch.softmax(T([5.0, 0.0]), -1)[0])


def test_sampling_draws_each_token_with_its_tempered_probability():
    """Inverse CDF: uniform draws on an even grid land on each token in proportion to softmax(logits / T)."""
    logits = T([[[2.0, 0.0, 9.0, 1.0, -1.0]]])  # token 2 is the MASK: never drawn
    grid = (torch.arange(1000) + 0.5) / 1000
    for t in (0.5, 1.0, 2.0):
        drawn = [decoders.candidates(logits, 2, T([0]), T([t]), u.reshape(1, 1))[0].item() for u in grid]
        expected = torch.softmax(T([2.0, 0.0, 1.0, -1.0]) / t, -1)
        share = torch.tensor([drawn.count(i) for i in (0, 1, 3, 4)]) / len(grid)
        assert torch.allclose(share, expected, atol=2e-3), t
    both = torch.cat([logits, logits])  # only the rows listed as sampled draw; the others take the argmax
    x, _ = decoders.candidates(both, 2, T([1]), T([1.0]), T([[0.99]]))
    assert x.tolist() == [[0], [4]]


def test_credit_accumulates_on_a_stable_argmax_and_decays():
    logits = torch.log(T([[[0.6, 0.4]]]))
    credit = torch.zeros(1, 1, 2)
    masked = T([[True]])
    args = dict(alpha=T([0.7]), beta=T([0.8]), gamma=T([0.2]))
    fused, credit = decoders.credit_fuse(logits, credit, masked, first_step=T([True]), **args)
    assert torch.allclose(credit[0, 0], T([0.6 ** 0.2, 0.0]))
    fused, credit2 = decoders.credit_fuse(logits, credit, masked, first_step=T([False]), **args)
    assert abs(credit2[0, 0, 0].item() - (0.8 * 0.6 ** 0.2 + 0.6 ** 0.2)) < 1e-6
    # the stable candidate's margin grows: its fused probability rises above the raw 0.6
    assert torch.softmax(fused, -1)[0, 0, 0] > 0.6


def test_soft_embedding_is_the_expected_embedding():
    emb = T([[1.0, 0.0], [0.0, 1.0]])
    logits = torch.log(T([[[0.25, 0.75]]]))
    assert torch.allclose(decoders.soft_embedding(logits, emb), T([[[0.25, 0.75]]]))


def test_stops_last_allows_a_stop_token_only_once_everything_left_of_it_is_decided():
    E, a, b = 2, 10, 11  # E: the stop id
    stop_ids = T([[E, -1]])
    x = T([[a, E, E, b]])
    masked = torch.ones(1, 4, dtype=torch.bool)
    conf = T([[0.5, 0.99, 0.99, 0.99]])
    # position 0 stays masked at sure=0.9, so the EOS run after it must wait; content never waits
    assert decoders.stops_last(x, conf, masked, stop_ids, T([0.9])).tolist() == [[True, False, False, True]]
    # everything left of the EOS run is committed in this step: the run may go with it
    assert decoders.stops_last(x, conf, masked, stop_ids, T([0.4])).tolist() == [[True, True, True, True]]


def test_stops_last_counts_committed_positions_as_decided_and_never_blocks_the_leftmost_mask():
    E = 2
    x, conf = T([[5, E, E, E]]), T([[0.1, 0.1, 0.1, 0.1]])
    masked = T([[False, True, True, True]])
    never = T([2.0])  # decoders without a threshold: nothing counts as committed in this step
    assert decoders.stops_last(x, conf, masked, T([[E]]), never).tolist() == [[False, True, False, False]]


def test_forbid_early_bans_each_rows_stop_ids_before_its_limit_and_ignores_padding():
    logits = torch.zeros(2, 3, 5)
    stop_ids = T([[4, 1], [2, -1]])  # row 1 has one stop id, padded with -1
    out = decoders.forbid_early(logits, T([2, 1]), stop_ids)
    banned = out == float("-inf")
    assert banned[0].nonzero().tolist() == [[0, 1], [0, 4], [1, 1], [1, 4]]  # positions 0-1, ids 1 and 4
    assert banned[1].nonzero().tolist() == [[0, 2]]  # position 0, id 2; the padding bans nothing


def _kept_by_definition(logits: torch.Tensor, t: float, k: int, p: float, min_p: float) -> set[int]:
    """vLLM's candidate set at one position, written out: the tokens at least min_p times as likely as
    the most likely one, the top k of them (0 = all), and the smallest most-likely-first prefix of
    those whose tempered probabilities, renormalised over them, reach p."""
    tempered = torch.softmax(logits / t, -1)
    kept = [i for i in range(len(logits)) if tempered[i] >= min_p * tempered.max()]
    order = sorted(kept, key=lambda i: -float(logits[i]))
    top = order[:k] if k else order
    probs = torch.softmax(logits[top] / t, -1).tolist()
    nucleus, total = [], 0.0
    for i, q in zip(top, probs):
        if total >= p:
            break
        nucleus.append(i)
        total += q
    return set(nucleus)


def test_sampling_floor_keeps_min_p_then_the_top_k_then_the_nucleus():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, 12, generator=g) * 2
    # (temperature, top_k, top_p, min_p); in the last row min_p changes which tokens the nucleus holds
    rows = [(1.0, 0, 0.8, 0.0), (0.5, 4, 1.0, 0.0), (1.5, 6, 0.7, 0.0), (1.0, 0, 1.0, 0.2), (2.0, 0, 0.7, 0.2)]
    temperature, top_k, top_p, min_p = (T(list(col)) for col in zip(*rows))
    top_k = top_k.long()
    floor = decoders.sampling_floor(logits, temperature, top_k, top_p, min_p, ranked=12, nucleus=True)
    for i, (t, k, p, mp) in enumerate(rows):
        for j in range(3):
            kept = {v for v in range(12) if logits[i, j, v] >= floor[i, j]}
            assert kept == _kept_by_definition(logits[i, j], t, k, p, mp), (i, j)
    # Rows with a top_k rank only that many tokens, the nucleus included; the whole vocabulary is
    # sorted only for a top_p without a top_k.
    for i, ranked, nucleus in [(1, 4, False), (2, 6, True), (3, 0, False)]:
        one = slice(i, i + 1)
        alone = decoders.sampling_floor(logits[one], temperature[one], top_k[one], top_p[one], min_p[one],
                                        ranked=ranked, nucleus=nucleus)
        assert torch.equal(alone, floor[one]), i
    # A top_k above the vocabulary keeps every token.
    wide = decoders.sampling_floor(logits[:1], T([1.0]), T([50]), T([1.0]), T([0.0]), ranked=50, nucleus=False)
    assert (logits[:1] >= wide[..., None]).all()


def _nucleus_rows(widths: list[list[bool]], vocab: int = 3000) -> torch.Tensor:
    """Logits [rows, positions, vocab]: a wide nucleus where True (nearly flat, ~90 % of the vocabulary at
    top_p 0.9), a narrow one where False (a handful of tokens)."""
    g = torch.Generator().manual_seed(1)
    scale = T([[0.05 if wide else 8.0 for wide in row] for row in widths])
    return torch.randn(len(widths), len(widths[0]), vocab, generator=g) * scale[..., None]


def test_a_top_p_without_top_k_ranks_a_few_tokens_and_the_whole_vocabulary_only_where_its_nucleus_is_wide():
    """Open nuclei (top_p, no top_k) are looked for among the `ranked` most likely tokens; the positions
    whose nucleus reaches past them are found by their mass and ranked again over the whole vocabulary:
    the floors are those of ranking the whole vocabulary everywhere, position by position."""
    wide = [[False, False, False, False], [True, False, False, True], [False] * 4, [True] * 4]
    logits = _nucleus_rows(wide)
    # (temperature, top_k, top_p, min_p): open nuclei, a top_k with a nucleus, an open nucleus after min_p
    rows = [(1.0, 0, 0.9, 0.0), (0.8, 0, 0.9, 0.0), (1.0, 40, 0.8, 0.0), (1.0, 0, 0.9, 1e-4)]
    temperature, top_k, top_p, min_p = (T(list(col)) for col in zip(*rows))
    top_k = top_k.long()
    lowest = decoders.min_p_floor(logits, temperature, min_p)
    _, short = decoders._ranked_floor(logits, temperature, top_k, top_p, lowest, 64, True, check=True)
    assert short.tolist() == wide  # row 3: min_p keeps too many tokens for 64 to hold the nucleus

    everywhere = decoders.sampling_floor(logits, temperature, top_k, top_p, min_p, ranked=3000, nucleus=True)
    for part in [slice(None), slice(3, 4), slice(0, 1)]:  # 6 of 16 positions wide, all of them, none
        sub = (logits[part], temperature[part], top_k[part], top_p[part], min_p[part])
        floor = decoders.sampling_floor(*sub, ranked=64, nucleus=True, open_nucleus=True)
        assert torch.equal(floor, everywhere[part])
    for i, j in [(0, 0), (1, 0), (1, 1), (2, 2), (3, 1)]:
        t, k, p, mp = rows[i]
        kept = {v for v in range(3000) if logits[i, j, v] >= everywhere[i, j]}
        assert kept == _kept_by_definition(logits[i, j], t, k, p, mp), (i, j)


def test_candidates_sample_only_above_the_floor_and_keep_the_unfiltered_confidence():
    logits = T([[[3.0, 2.0, 0.0, 0.0]]])
    x, _ = decoders.candidates(logits, 3, T([0]), T([1.0]), T([[0.999]]))  # the draw's end of the CDF: token 2
    assert x.item() == 2
    x, conf = decoders.candidates(logits, 3, T([0]), T([1.0]), T([[0.999]]), floor=T([[2.0]]))  # token 2 is below the floor
    assert x.item() == 1
    assert torch.allclose(conf, torch.softmax(T([3.0, 2.0, 0.0]), -1)[1])


def test_logit_bias_adds_each_rows_biases_at_every_position_and_ignores_padding():
    logits = torch.zeros(2, 3, 5)
    out = decoders.add_logit_bias(logits, T([[4, 1], [2, -1]]), T([[-100.0, 2.5], [7.0, 0.0]]))
    assert out[0, :, 4].tolist() == [-100.0] * 3 and out[0, :, 1].tolist() == [2.5] * 3
    assert out[1, :, 2].tolist() == [7.0] * 3
    assert (out[0, :, [0, 2, 3]] == 0).all() and (out[1, :, [0, 1, 3, 4]] == 0).all()


def test_repetition_penalty_lowers_seen_tokens_and_presence_frequency_charge_generated_ones():
    logits = T([[[2.0, -2.0, 2.0, 1.0]]])  # one row, one position, 4 tokens
    counts = T([[3.0, 0.0, 0.0, 0.0]])  # token 0 generated three times
    seen = T([[True, True, False, False]])  # token 1 only in the prompt
    out = decoders.apply_penalties(logits, counts, seen, presence=T([0.5]), frequency=T([0.25]), repetition=T([2.0]))
    # 0: 2/2 - 0.25*3 - 0.5; 1: -2*2 (the prompt counts for repetition only); 2, 3: unseen, untouched
    assert out[0, 0].tolist() == [1.0 - 0.75 - 0.5, -4.0, 2.0, 1.0]
