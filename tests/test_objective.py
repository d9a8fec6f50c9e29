"""The dLLM-Var noising and loss."""

import pytest
import torch

import dllm

MASK, EOS, EOT = 3, 2, 6


def _row_batch(rows=64, length=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 40, (rows, length), generator=g)
    prompt = torch.zeros(rows, length, dtype=torch.bool)
    seg = torch.zeros(rows, length, dtype=torch.int32)
    # Samples of 32 tokens per row: 10 prompt tokens, 21 response tokens, EOS (EOT every other one).
    for s in range(length // 32):
        lo = s * 32
        prompt[:, lo:lo + 10] = True
        ids[:, lo + 31] = EOS if s % 2 == 0 else EOT
        seg[:, lo:lo + 32] = s + 1
    return ids, prompt, seg


def _noise(ids, prompt, seg, seed=1, **kw):
    return dllm.noise_batch(ids, prompt, seg, mask_token_id=MASK, terminal_token_ids=(EOS, EOT),
                            generator=torch.Generator().manual_seed(seed), **kw)


def test_terminal_tokens_are_always_masked_and_prompts_never():
    ids, prompt, seg = _row_batch()
    out = _noise(ids, prompt, seg)
    terminal = (ids == EOS) | (ids == EOT)
    assert (out.input_ids[terminal] == MASK).all()
    assert (out.input_ids[prompt] == ids[prompt]).all()


def test_response_tokens_are_masked_with_probability_t_per_row():
    ids, prompt, seg = _row_batch()
    out = _noise(ids, prompt, seg)
    assert ((out.t >= 0.1) & (out.t <= 0.9)).all()
    ordinary = ~prompt & (ids != EOS) & (ids != EOT)
    rate = ((out.input_ids == MASK) & ordinary).sum(1).float() / ordinary.sum(1)
    # 168 ordinary response tokens per row: the observed rate tracks that row's t.
    assert (rate - out.t).abs().max() < 0.15
    assert torch.corrcoef(torch.stack([rate, out.t]))[0, 1] > 0.95


def test_loss_covers_exactly_the_masked_response_positions():
    ids, prompt, seg = _row_batch()
    out = _noise(ids, prompt, seg)
    assert torch.equal(out.loss_mask, out.input_ids == MASK)
    assert torch.equal(out.targets, ids)


def test_noising_is_deterministic_under_a_seed():
    ids, prompt, seg = _row_batch()
    a, b, c = _noise(ids, prompt, seg, seed=5), _noise(ids, prompt, seg, seed=5), _noise(ids, prompt, seg, seed=6)
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)


def test_padding_is_never_masked():
    ids, prompt, seg = _row_batch(rows=4)
    seg[:, 200:] = 0
    out = _noise(ids, prompt, seg, t_min=1.0, t_max=1.0)
    assert (out.input_ids[:, 200:] == ids[:, 200:]).all()
    assert not out.loss_mask[:, 200:].any()


def test_tail_masking_masks_everything_after_a_sample_end_outside_the_loss():
    ids, prompt, seg = _row_batch(rows=32)
    out = _noise(ids, prompt, seg, tail_mask_prob=1.0)
    for row in range(32):
        masked_prompt = torch.nonzero(prompt[row] & (out.input_ids[row] == MASK)).flatten()
        assert len(masked_prompt) > 0  # every row got a tail (each row has 7 inner boundaries)
        start = int(masked_prompt[0])
        assert start % 32 == 0  # the tail begins right after a sample's EOS
        assert (out.input_ids[row, start:] == MASK).all()
        assert not out.loss_mask[row, start:].any()
        assert out.loss_mask[row, start - 1]  # the boundary EOS itself stays in the loss


def test_tail_eos_targets_teach_every_position_past_the_answer_to_say_eos():
    ids, prompt, seg = _row_batch(rows=16)
    plain = _noise(ids, prompt, seg, tail_mask_prob=1.0)
    eos = _noise(ids, prompt, seg, tail_mask_prob=1.0, tail_target_id=EOS)
    assert torch.equal(plain.input_ids, eos.input_ids)  # the same noise: only targets and loss differ
    tail = (plain.input_ids == MASK) & prompt  # tail positions that hold the next samples' prompts
    for row in range(16):
        start = int(torch.nonzero(tail[row]).flatten()[0])
        assert (eos.targets[row, start:] == EOS).all() and eos.loss_mask[row, start:].all()
        assert torch.equal(eos.targets[row, :start], ids[row, :start])
        assert torch.equal(eos.loss_mask[row, :start], plain.loss_mask[row, :start])


def test_complementary_pairs_put_every_response_token_in_the_loss_exactly_once():
    ids, prompt, seg = _row_batch(rows=8)
    out = _noise(ids, prompt, seg, complementary=True)
    assert out.input_ids.shape == (16, 256)
    first, second = out.input_ids[:8], out.input_ids[8:]
    assert torch.equal(first, _noise(ids, prompt, seg).input_ids)  # the first half is the ordinary draw
    terminal = (ids == EOS) | (ids == EOT)
    ordinary = ~prompt & ~terminal
    assert torch.equal((first == MASK) & ordinary, ordinary & (second != MASK))  # exact complements
    assert ((first == MASK) & (second == MASK))[terminal].all()  # terminals in both halves
    assert (first[prompt] == ids[prompt]).all() and (second[prompt] == ids[prompt]).all()
    assert torch.allclose(out.t[8:], 1 - out.t[:8])
    assert torch.equal(out.targets, ids.repeat(2, 1))


def test_complementary_pairs_share_their_tails():
    ids, prompt, seg = _row_batch(rows=8)
    out = _noise(ids, prompt, seg, complementary=True, tail_mask_prob=1.0, tail_target_id=EOS)
    tail = (out.input_ids == MASK) & prompt.repeat(2, 1)
    assert tail[:8].any(1).all() and torch.equal(tail[:8], tail[8:])
    assert (out.targets[tail] == EOS).all() and out.loss_mask[tail].all()


def test_clean_prefix_rows_keep_each_answer_clean_before_a_random_cut():
    ids, prompt, seg = _row_batch()
    out = _noise(ids, prompt, seg, clean_prefix_prob=1.0)
    masked = out.input_ids == MASK
    terminal = (ids == EOS) | (ids == EOT)
    assert masked[terminal].all() and not masked[prompt].any()
    cuts = []
    for s in range(256 // 32):
        answer = masked[:, s * 32 + 10: s * 32 + 31]  # 21 ordinary answer tokens per sample
        first = torch.where(answer.any(1), answer.int().argmax(1), torch.full((64,), 21))
        # Nothing is masked before the first masked token, so the clean run is a prefix of the answer...
        assert not (answer.int().cumsum(1) == 0)[answer].any()
        cuts.append(first)
    cuts = torch.cat(cuts)
    # ... whose length varies from sample to sample over the whole answer.
    assert cuts.min() <= 2 and cuts.max() >= 18 and cuts.unique().numel() > 10
    assert torch.equal(out.loss_mask, masked)
    # Complementary pairs share the clean prefixes: only the rest of each answer is split between them.
    pair = _noise(ids[:8], prompt[:8], seg[:8], clean_prefix_prob=1.0, complementary=True).input_ids == MASK
    clean = ~prompt[:8] & ~pair[:8] & ~pair[8:]
    assert clean.any() and not (clean & ((ids[:8] == EOS) | (ids[:8] == EOT))).any()


def test_clean_prefix_rows_are_the_asked_fraction_and_off_by_default():
    ids, prompt, seg = _row_batch()
    plain = _noise(ids, prompt, seg)
    assert torch.equal(plain.input_ids, _noise(ids, prompt, seg, clean_prefix_prob=0.0).input_ids)
    half = _noise(ids, prompt, seg, clean_prefix_prob=0.5, t_min=0.9, t_max=0.9)
    ordinary = ~prompt & (ids != EOS) & (ids != EOT)
    rate = ((half.input_ids == MASK) & ordinary).sum(1).float() / ordinary.sum(1)
    # A row without clean prefixes masks ~90 % of its answer tokens; with them ~half of that.
    with_prefix = rate < 0.8
    assert 16 <= with_prefix.sum() <= 48 and rate[with_prefix].mean() < 0.6 and rate[~with_prefix].mean() > 0.85
    with pytest.raises(ValueError, match="clean_prefix_prob"):
        _noise(ids, prompt, seg, clean_prefix_prob=1.5)


def test_tail_masking_off_by_default_matches_paper_objective():
    ids, prompt, seg = _row_batch()
    assert torch.equal(_noise(ids, prompt, seg).input_ids, _noise(ids, prompt, seg, tail_mask_prob=0.0).input_ids)


def test_loss_is_mean_ce_over_masked_positions_only():
    ids, prompt, seg = _row_batch(rows=2, length=64)
    out = _noise(ids, prompt, seg)
    logits = torch.randn(2, 64, 50)
    loss = dllm.diffusion_loss(logits, out.targets, out.loss_mask)
    manual = torch.nn.functional.cross_entropy(logits[out.loss_mask], ids[out.loss_mask])
    assert torch.allclose(loss, manual)
    # Changing logits at unmasked positions does not change the loss.
    logits2 = logits.clone()
    logits2[~out.loss_mask] += torch.randn_like(logits2[~out.loss_mask])
    assert torch.allclose(dllm.diffusion_loss(logits2, out.targets, out.loss_mask), loss)


def test_inverse_t_weighting():
    ids, prompt, seg = _row_batch(rows=2, length=64)
    out = _noise(ids, prompt, seg)
    logits = torch.randn(2, 64, 50)
    loss = dllm.diffusion_loss(logits, out.targets, out.loss_mask, out.t, weighting="inverse_t")
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), ids.reshape(-1), reduction="none").view(2, 64)
    manual = (ce * out.loss_mask / out.t[:, None]).sum() / ids.numel()
    assert torch.allclose(loss, manual)
    with pytest.raises(ValueError, match="weighting"):
        dllm.diffusion_loss(logits, out.targets, out.loss_mask, weighting="sqrt")


def test_per_sample_weighting_weighs_every_packed_sample_the_same():
    """A sample with one masked token counts as much as one with many: the mean over each
    sample's masked tokens, averaged over the samples (rows and segments apart)."""
    ids, prompt, seg = _row_batch(rows=2, length=64)
    out = _noise(ids, prompt, seg, tail_mask_prob=0.5, tail_target_id=EOS)
    logits = torch.randn(2, 64, 50)
    loss = dllm.diffusion_loss(logits, out.targets, out.loss_mask, weighting="per_sample",
                               segment_ids=out.segment_ids)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), out.targets.reshape(-1), reduction="none").view(2, 64)
    means = [ce[r][out.loss_mask[r] & (out.segment_ids[r] == s)].mean()
             for r in range(2) for s in out.segment_ids[r].unique().tolist()
             if (out.loss_mask[r] & (out.segment_ids[r] == s)).any()]
    assert torch.allclose(loss, torch.stack(means).mean())
    assert not torch.allclose(loss, dllm.diffusion_loss(logits, out.targets, out.loss_mask))
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 64, 16)
    assert torch.allclose(dllm.diffusion_loss(head(hidden), out.targets, out.loss_mask, weighting="per_sample",
                                              segment_ids=out.segment_ids),
                          dllm.diffusion_loss_from_hidden(hidden, head, out.targets, out.loss_mask,
                                                          weighting="per_sample", segment_ids=out.segment_ids),
                          atol=1e-6)
    with pytest.raises(ValueError, match="segment ids"):
        dllm.diffusion_loss(logits, out.targets, out.loss_mask, weighting="per_sample")


def _padded_batch():
    """Two rows of samples whose answers end in 1-4 terminals: the first ends, the rest pad."""
    ids, prompt, seg = _row_batch(rows=2, length=64)
    ids[0, 28:32] = EOS  # sample 1 of row 0: EOS + 3 padding
    ids[1, 60:63] = torch.tensor([EOT, EOS, EOS])  # sample 2 of row 1 ends EOT EOS EOS EOT: 3 padding
    ids[0, 63] = EOT  # a last sample with one terminal: no padding
    return ids, prompt, seg


def test_pad_eos_weight_marks_only_the_terminals_after_an_answers_first():
    ids, prompt, seg = _padded_batch()
    out = _noise(ids, prompt, seg, pad_eos_weight=0.25)
    padding = out.weights == 0.25
    assert torch.nonzero(padding).tolist() == [[0, 29], [0, 30], [0, 31], [1, 61], [1, 62], [1, 63]]
    assert (out.weights[~padding] == 1.0).all()
    assert _noise(ids, prompt, seg).weights is None  # weight 1: nothing to weigh
    # A terminal after the previous sample's EOS (no shared segment) is not padding.
    ids2, prompt2, seg2 = _row_batch(rows=1, length=64)
    ids2[0, 32] = EOS
    prompt2[0, 32] = False
    assert (_noise(ids2, prompt2, seg2, pad_eos_weight=0.5).weights == 1.0).all()
    paired = _noise(ids, prompt, seg, pad_eos_weight=0.25, complementary=True)
    assert torch.equal(paired.weights, out.weights.repeat(2, 1))
    tailed = _noise(ids, prompt, seg, pad_eos_weight=0.25, tail_mask_prob=1.0, tail_target_id=EOS)
    tail = (tailed.input_ids == MASK) & prompt
    assert tail.any() and (tailed.weights[tail] == 1.0).all()  # past the end: a tail, not padding
    with pytest.raises(ValueError, match="pad_eos_weight"):
        _noise(ids, prompt, seg, pad_eos_weight=1.5)


@pytest.mark.parametrize("weighting", ["mean", "inverse_t", "per_sample"])
def test_weighted_losses_count_each_position_by_its_weight(weighting):
    ids, prompt, seg = _padded_batch()
    out = _noise(ids, prompt, seg, pad_eos_weight=0.25)
    logits = torch.randn(2, 64, 50)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), out.targets.reshape(-1), reduction="none").view(2, 64)
    w = out.weights * out.loss_mask
    if weighting == "mean":
        manual = (ce * w).sum() / w.sum()
    elif weighting == "inverse_t":
        manual = (ce * w / out.t[:, None]).sum() / ids.numel()
    else:
        keys = [(r, s) for r in range(2) for s in out.segment_ids[r].unique().tolist()
                if (out.loss_mask[r] & (out.segment_ids[r] == s)).any()]
        manual = torch.stack([(ce[r] * w[r] * (out.segment_ids[r] == s)).sum() / (w[r] * (out.segment_ids[r] == s)).sum()
                              for r, s in keys]).mean()
    kw = dict(t=out.t, weighting=weighting, segment_ids=out.segment_ids)
    loss = dllm.diffusion_loss(logits, out.targets, out.loss_mask, weights=out.weights, **kw)
    assert torch.allclose(loss, manual)
    assert not torch.allclose(loss, dllm.diffusion_loss(logits, out.targets, out.loss_mask, **kw))
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 64, 16)
    assert torch.allclose(dllm.diffusion_loss(head(hidden), out.targets, out.loss_mask, weights=out.weights, **kw),
                          dllm.diffusion_loss_from_hidden(hidden, head, out.targets, out.loss_mask, weights=out.weights,
                                                          **kw), atol=1e-6)


def test_document_mask_is_block_diagonal():
    seg = torch.tensor([[1, 1, 2, 2, 0]])
    m = dllm.document_attention_mask(seg)[0]
    assert m[0, 1] and not m[0, 2] and m[2, 3] and not m[3, 4]


def test_a_tail_joins_the_document_of_the_sample_it_follows():
    """Under a block-diagonal mask the masks past an answer must see that answer (and it them), as
    at inference: the noised batch's documents give the tail the ended sample's segment id."""
    ids, prompt, seg = _row_batch(rows=16)
    out = _noise(ids, prompt, seg, tail_mask_prob=0.5, tail_target_id=EOS)
    tailed = ((out.input_ids == MASK) & prompt).any(1)
    assert 0 < int(tailed.sum()) < 16
    for row in range(16):
        if not tailed[row]:
            assert torch.equal(out.segment_ids[row], seg[row])
            continue
        start = int(torch.nonzero((out.input_ids[row] == MASK) & prompt[row]).flatten()[0])
        assert torch.equal(out.segment_ids[row, :start], seg[row, :start])
        assert (out.segment_ids[row, start:] == seg[row, start - 1]).all()
        visible = dllm.document_attention_mask(out.segment_ids[row:row + 1])[0]
        assert visible[start:, start - 32:start].all() and visible[start - 32:start, start:].all()
    paired = _noise(ids, prompt, seg, tail_mask_prob=0.5, tail_target_id=EOS, complementary=True)
    assert torch.equal(paired.segment_ids, out.segment_ids.repeat(2, 1))
    assert _noise(ids, prompt, None).segment_ids is None


def test_loss_from_hidden_equals_loss_from_full_logits():
    ids, prompt, seg = _row_batch(rows=2, length=64)
    out = _noise(ids, prompt, seg)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 64, 16)
    full = dllm.diffusion_loss(head(hidden), out.targets, out.loss_mask, out.t, weighting="inverse_t")
    part = dllm.diffusion_loss_from_hidden(hidden, head, out.targets, out.loss_mask, out.t, weighting="inverse_t")
    assert torch.allclose(full, part, atol=1e-6)


def test_under_the_document_mask_a_tail_document_sees_nothing_of_the_other_samples(tiny_config):
    """The training forward with document_attention_mask(noised.segment_ids): the hidden states of
    the last document (a sample and the tail past it) do not change when an earlier sample does."""
    ids, prompt, seg = _row_batch(rows=4, length=96)
    ids = ids % 20 + 10  # inside the tiny vocabulary, clear of its special ids
    ids[:, 31::32] = tiny_config.eos_token_id
    noise = lambda x: dllm.noise_batch(x, prompt, seg, mask_token_id=tiny_config.mask_token_id,  # noqa: E731
                                       terminal_token_ids=tiny_config.stop_token_ids, tail_mask_prob=1.0,
                                       tail_target_id=tiny_config.eos_token_id,
                                       generator=torch.Generator().manual_seed(3))
    model = dllm.build_model(tiny_config, seed=0).eval()
    other = ids.clone()
    other[:, :20] = 11  # rewrite the first sample's tokens
    a, b = noise(ids), noise(other)
    assert torch.equal(a.segment_ids, b.segment_ids)
    with torch.no_grad():
        ha = model(a.input_ids, attention_mask=dllm.document_attention_mask(a.segment_ids), return_hidden=True)
        hb = model(b.input_ids, attention_mask=dllm.document_attention_mask(b.segment_ids), return_hidden=True)
        full = model(b.input_ids, return_hidden=True)
    last = a.segment_ids != 1  # every document but the first sample's (its rows' tails join sample 1 or 2)
    assert not last[:, :32].any() and last.any()
    assert torch.allclose(ha[last], hb[last], atol=1e-5)
    assert not torch.allclose(ha[last], full[last], atol=1e-3)  # full attention does see the first sample


def test_a_cut_answer_is_seen_only_up_to_its_cut_and_past_the_cut_everything_is_seen():
    """cut_answer_prob: in the picked rows every answer is cut after 1 .. n-1 of its tokens; the sample's
    prompt and tokens up to the cut attend to nothing past it (a block of an answer that goes on past
    the block, as at inference), the positions past it see the whole sample and keep their loss."""
    ids, prompt, seg = _row_batch(rows=32)
    out = _noise(ids, prompt, seg, cut_answer_prob=0.5)
    assert out.view_ends is not None and out.view_ends.shape == ids.shape
    plain = _noise(ids, prompt, seg)
    assert torch.equal(out.input_ids, plain.input_ids) and torch.equal(out.loss_mask, plain.loss_mask)
    cut_rows = (out.view_ends < 255).any(1)
    assert 0 < int(cut_rows.sum()) < 32
    kept = []
    for row in range(32):
        for s in range(8):
            lo, hi = s * 32, s * 32 + 32
            ends = out.view_ends[row, lo:hi]
            if not cut_rows[row]:
                assert (ends == 255).all()
                continue
            end = int(ends[0])  # the prompt's first position sees up to the cut
            assert lo + 10 <= end < hi - 1  # 1 .. 21 of the 22 response tokens kept
            assert (ends[:end - lo + 1] == end).all() and (ends[end - lo + 1:] == 255).all()
            kept.append(end - lo - 9)
    assert min(kept) == 1 and max(kept) >= 18  # uniform over 1 .. 21
    mask = out.attention_mask()[cut_rows][0]
    end = int(out.view_ends[cut_rows][0, 0])
    assert mask[0, end] and not mask[0, end + 1] and not mask[end, end + 1]
    assert mask[end + 1, 0] and mask[end + 1, 31] and not mask[end + 1, 32]  # past the cut: the whole sample only
    assert torch.equal(plain.attention_mask(), dllm.document_attention_mask(seg))
    assert plain.attention_mask(documents=False) is None
    full = out.attention_mask(documents=False)[cut_rows][0]  # without documents only the cut limits
    assert not full[0, end + 1] and full[end + 1, 200]


def test_answer_cuts_keep_tails_whole_and_pair_with_complements():
    ids, prompt, seg = _row_batch(rows=16)
    out = _noise(ids, prompt, seg, cut_answer_prob=1.0, tail_mask_prob=1.0, tail_target_id=EOS)
    tail = (out.input_ids == MASK) & prompt
    assert tail.any() and (out.view_ends[tail] == 255).all()
    paired = _noise(ids[:8], prompt[:8], seg[:8], cut_answer_prob=1.0, complementary=True)
    assert torch.equal(paired.view_ends[:8], paired.view_ends[8:])
    with pytest.raises(ValueError, match="cut_answer_prob must be in"):
        _noise(ids, prompt, seg, cut_answer_prob=-0.1)


def test_the_view_before_a_cut_is_the_inference_state(tiny_config):
    """The training forward over a cut sample gives the positions before the cut the hidden states of
    the sample alone ended at the cut: what the engine's block forward sees."""
    ids, prompt, seg = _row_batch(rows=4, length=64)
    ids = ids % 20 + 10
    ids[:, 31::32] = tiny_config.eos_token_id
    out = dllm.noise_batch(ids, prompt, seg, mask_token_id=tiny_config.mask_token_id,
                           terminal_token_ids=tiny_config.stop_token_ids, cut_answer_prob=1.0,
                           generator=torch.Generator().manual_seed(5))
    model = dllm.build_model(tiny_config, seed=0).eval()
    with torch.no_grad():
        hidden = model(out.input_ids, attention_mask=out.attention_mask(), return_hidden=True)
        for row in range(4):
            end = int(out.view_ends[row, 0])
            alone = model(out.input_ids[row:row + 1, :end + 1], return_hidden=True)
            assert torch.allclose(hidden[row, :end + 1], alone[0], atol=1e-5)
            assert not torch.allclose(hidden[row, end + 1:32], model(out.input_ids[row:row + 1, end + 1:32],
                                                                  return_hidden=True)[0], atol=1e-3)
