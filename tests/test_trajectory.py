"""Trajectory compression: recorded trajectories replay the engine's decoding, gold filtering, and the
compressed-transition objective."""

import pytest
import torch

import dllm
from dllm.engine.request import BlockTrajectory
from dllm.trajectory import Trajectory, exact_match, record_gold, transition_batch

CFG = dllm.GenerationConfig(block_size=8, threshold=0.9, max_new_tokens=32)


def _prompts():
    return [list(range(7, 7 + n)) for n in (3, 5, 8, 11)]


def test_recorded_trajectory_accounts_for_every_forward_and_token(talkative_model):
    engine = dllm.Engine(talkative_model, max_batch_size=4, max_model_len=128)
    gens = engine.generate(_prompts(), CFG.replace(record_trajectory=True))
    assert all(g.token_ids for g in gens)
    for gen in gens:
        blocks = gen.trajectory
        assert len(blocks) == gen.num_blocks
        assert sum(b.steps for b in blocks) == gen.num_forwards  # each forward is one step of one block
        for b in blocks:
            assert len(b.tokens) == CFG.block_size and min(b.reveal_step) >= 0  # no early stop: all decoded
            assert set(b.reveal_step) == set(range(b.steps))  # every step commits at least one position
        produced = [t for b in blocks for t in b.tokens]
        assert produced[: len(gen.token_ids)] == gen.token_ids


def test_recording_does_not_change_the_answers(talkative_model):
    engine = dllm.Engine(talkative_model, max_batch_size=4, max_model_len=128)
    plain = engine.generate(_prompts(), CFG)
    recorded = engine.generate(_prompts(), CFG.replace(record_trajectory=True))
    assert [g.token_ids for g in recorded] == [g.token_ids for g in plain]
    assert all(g.trajectory is None for g in plain)


def test_only_verified_trajectories_are_kept(talkative_model, char_tokenizer):
    engine = dllm.Engine(talkative_model, char_tokenizer, max_batch_size=4, max_model_len=128)
    answers = [g.text for g in engine.generate(["ab", "cab", "abc"], CFG)]
    assert all(answers)
    samples = [{"instruction": "ab", "output": answers[0]}, {"instruction": "cab", "output": answers[1] + "?"},
               {"instruction": "abc", "output": answers[2]}]
    gold, stats = record_gold(engine, samples, CFG, verifier=exact_match)
    assert [t.text for t in gold] == [answers[0], answers[2]]
    assert stats["decoded"] == 3 and stats["kept"] == 2
    gold, _ = record_gold(engine, samples, CFG, verifier=lambda s, text: False)  # the verifier is pluggable
    assert gold == []


def test_transition_batch_shows_state_i_and_targets_the_reveals_up_to_j():
    mask = 99
    traj = Trajectory(prompt_ids=[1, 2, 3], text="", blocks=[
        BlockTrajectory(tokens=[10, 11, 12, 13], reveal_step=[0, 0, 1, 2]),
        BlockTrajectory(tokens=[20, 21, 22, 2], reveal_step=[1, 0, 2, -1]),  # position 3: never committed
    ])
    seen = set()
    for seed in range(60):
        batch = transition_batch([traj], mask_token_id=mask, pad_token_id=0,
                                 generator=torch.Generator().manual_seed(seed))
        row, target, loss = batch.input_ids[0].tolist(), batch.targets[0].tolist(), batch.loss_mask[0].tolist()
        k = 0 if len(row) == 7 else 1
        block = traj.blocks[k]
        context = [1, 2, 3] + ([] if k == 0 else [10, 11, 12, 13])
        assert row[: len(context)] == context and target == context + block.tokens
        assert not any(loss[: len(context)])
        state, delta = row[len(context):], loss[len(context):]
        i = min([r for r, t in zip(block.reveal_step, state) if t == mask and r >= 0], default=block.steps)
        for tok, r, s, d in zip(block.tokens, block.reveal_step, state, delta):
            assert s == (tok if 0 <= r < i else mask)  # state s_i
            assert not d or (r >= i)  # targets are only positions still masked in s_i
            if r < 0:
                assert s == mask and not d  # never committed: masked, no loss
        assert any(delta)  # j > i: at least the step-i reveals are targets
        seen.add((k, i, tuple(delta)))
    assert len(seen) > 4  # blocks and (i, j) pairs vary


def test_compressed_transition_objective_trains(talkative_model):
    import copy

    model = copy.deepcopy(talkative_model)
    engine = dllm.Engine(model, max_batch_size=4, max_model_len=128)
    gens = engine.generate(_prompts(), CFG.replace(record_trajectory=True))
    trajs = [Trajectory(p, g.trajectory, "") for p, g in zip(_prompts(), gens)]
    cfg = model.config
    batch = transition_batch(trajs, mask_token_id=cfg.mask_token_id, pad_token_id=cfg.pad_token_id,
                             generator=torch.Generator().manual_seed(0))
    head = model.model.transformer["ff_out"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        hidden = model(batch.input_ids, return_hidden=True)
        loss = dllm.diffusion_loss_from_hidden(hidden, head, batch.targets, batch.loss_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_verifiers_are_named_or_imported():
    from pipelines.trajectories import load_verifier

    assert load_verifier("exact_match")({"output": "ab"}, "ab")
    assert load_verifier("any")({"output": "ab"}, "zz")
    assert load_verifier("dllm.trajectory:exact_match") is exact_match  # package.module:function
    with pytest.raises(ValueError, match="exact_match, any, or package.module:function"):
        load_verifier("strict")


def test_stored_rows_round_trip():
    traj = Trajectory(prompt_ids=[1, 2], text="", blocks=[BlockTrajectory([5, 6], [0, 1]), BlockTrajectory([7, 2], [0, -1])])
    row = traj.to_row()
    assert row == {"prompt_ids": [1, 2], "tokens": [5, 6, 7, 2], "reveal_step": [0, 1, 0, -1], "block_size": 2}
    assert Trajectory.from_row(row) == traj
