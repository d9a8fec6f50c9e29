"""Ray Train + DeepSpeed SFT on CPU: 2 workers, gloo, ZeRO-2."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import dllm
from train.config import ConfigError, TrainConfig
from train.loop import DS_STATE_DIR, EVAL_SEED, FAULT_MARKER
from train.schedule import learning_rate, run_progress
from train.sft import final_model_dir, main, run_training

pytestmark = pytest.mark.slow

SEQ = 64


def _write_packed(root, tokenizer, eos_pad: int = 0, word_lengths=(1, 5), prompt="reverse: {} =>", n=400, seed=0):
    """A reverse task packed the dLLM-Var way and written as the pipeline writes it."""
    rng = random.Random(seed)
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    samples = []
    for i in range(n):
        word = "".join(rng.choice("abcdef") for _ in range(rng.randint(*word_lengths)))
        samples.append((enc(prompt.format(word)), dllm.eos_padded(enc(word[::-1]) + [eos], eos, eos_pad, key=str(i))))
    rows = dllm.pack_samples(samples, SEQ, mode="concat", pad_token_id=eos)
    table = pa.table({"input_ids": [r.tolist() for r in rows.input_ids],
                      "prompt_mask": [r.tolist() for r in rows.prompt_mask],
                      "segment_ids": [r.tolist() for r in rows.segment_ids]})
    (root / "data").mkdir()
    pq.write_table(table, str(root / "data" / "part-0.parquet"))
    tokenizer.save_pretrained(str(root / "tok"))
    return root


@pytest.fixture(scope="module")
def packed_data(tmp_path_factory, char_tokenizer):
    return _write_packed(tmp_path_factory.mktemp("train"), char_tokenizer)


@pytest.fixture(scope="module")
def padded_data(tmp_path_factory, char_tokenizer):
    return _write_packed(tmp_path_factory.mktemp("padded"), char_tokenizer, eos_pad=8)


@pytest.fixture(scope="module")
def four_per_row_data(tmp_path_factory, char_tokenizer):
    """Samples of exactly 16 tokens: every packed row holds 4 whole samples."""
    root = _write_packed(tmp_path_factory.mktemp("four"), char_tokenizer, word_lengths=(5, 5), prompt="rev:{}>", n=480)
    segments = pq.read_table(str(root / "data" / "part-0.parquet")).column("segment_ids").to_pylist()
    assert len(segments) == 120 and all(max(s) == 4 and min(s) == 1 for s in segments)
    return root


def _config(root, name, **kw):
    base = dict(run_name=name, data=str(root / "data"), tokenizer=str(root / "tok"), storage_path=str(root / "runs"),
                model_config={"d_model": 48, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "mlp_hidden_size": 96,
                              "max_sequence_length": 512, "rope_theta": 10000.0},
                seq_len=SEQ, micro_batch_size=4, num_workers=2, precision="fp32", lr=3e-3, warmup_steps=3,
                max_steps=30, checkpoint_every=10, log_every=5, tail_mask_prob=0.5)
    base.update(kw)
    return TrainConfig(**base)


def _history(result):
    return json.loads((final_model_dir(result) / "trainer_state.json").read_text())


def test_loss_goes_down_and_the_checkpoint_loads_and_generates(ray_local, packed_data):
    result = run_training(_config(packed_data, "learn"))
    assert result.error is None
    state = _history(result)
    losses = [h["loss"] for h in state["history"]]
    assert state["step"] == 30 and len(losses) == 6
    assert losses[-1] < 0.8 * losses[0]
    # The logged rate is the cosine schedule's (warm-up 3, floor 10 %); step s ran at the progress after s - 1.
    expected = [learning_rate(lr=3e-3, schedule="cosine", warmup_steps=3, min_lr_ratio=0.1, step=h["step"],
                              progress=(h["step"] - 1) / 30) for h in state["history"]]
    assert [h["lr"] for h in state["history"]] == pytest.approx(expected)
    assert state["history"][-1]["lr"] < 0.11 * 3e-3
    model = dllm.load_model(final_model_dir(result))
    tok = dllm.load_tokenizer(final_model_dir(result))
    gen = dllm.Engine(model, tok, max_model_len=128).generate(["reverse: abc =>"], dllm.GenerationConfig(
        block_size=8, max_new_tokens=16))[0]
    assert gen.finish_reason in ("stop", "length") and gen.num_forwards >= 1
    assert (Path(result.checkpoint.path) / DS_STATE_DIR).is_dir()


def test_pad_eos_weight_and_answer_cuts_reach_the_loss_through_the_job(ray_local, padded_data):
    """Same rows, same noise: weighing the EOS padding less, or cutting the answers' views (under the
    document mask), changes the very first logged loss."""
    first = {}
    for name, option in {"plain": {}, "pad": {"pad_eos_weight": 0.25}, "cut": {"cut_answer_prob": 1.0}}.items():
        result = run_training(_config(padded_data, name, max_steps=5, document_mask=True, **option))
        assert result.error is None
        first[name] = _history(result)["history"][0]["loss"]
    assert all(math.isfinite(x) for x in first.values())
    assert first["pad"] != pytest.approx(first["plain"], rel=1e-3)
    # An untrained model attends almost evenly: hiding a few positions moves its loss by ~1e-4 (runs are
    # deterministic to far better than that)
    assert first["cut"] != pytest.approx(first["plain"], rel=1e-5)


def test_samples_and_tokens_seen_count_every_micro_batch_of_every_rank_under_per_sample_weighting(
        ray_local, four_per_row_data):
    """The train config takes every weighting the objective has: per_sample weighs each of a row's four samples
    by its own masked positions, which needs the batch's segment ids."""
    # 2 ranks x 4 rows per micro-batch x 2 micro-batches per step x 6 steps, 4 samples and 64 tokens a row.
    result = run_training(_config(four_per_row_data, "counts", max_steps=6, grad_accum=2, log_every=3,
                                  checkpoint_every=6, tail_mask_prob=0.0, loss_weighting="per_sample"))
    assert result.error is None
    state = _history(result)
    assert (state["step"], state["micro_steps"]) == (6, 12)
    assert state["samples_seen"] == 2 * 4 * 2 * 6 * 4
    assert state["tokens_seen"] == 2 * 4 * 2 * 6 * SEQ
    losses = [h["loss"] for h in state["history"]]
    assert [h["step"] for h in state["history"]] == [3, 6] and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # per_sample weighting trains (3.68 -> 3.25 here)


def test_resubmitting_the_same_run_resumes_step_and_optimizer_state(ray_local, packed_data):
    """Rows shuffled per epoch (the run crosses an epoch: over 100 rows, 8 a step) replay alike after the resume."""
    shuffled = {"shuffle_buffer_rows": 32}
    first = run_training(_config(packed_data, "resume", max_steps=10, checkpoint_every=10, **shuffled))
    state1 = _history(first)
    assert state1["step"] == 10
    second = run_training(_config(packed_data, "resume", max_steps=20, checkpoint_every=10, **shuffled))
    state2 = _history(second)
    assert state2["step"] == 20
    assert state2["micro_steps"] == 20 * 1  # no micro-batch repeated or skipped
    assert [h["step"] for h in state2["history"]] == [5, 10, 15, 20]  # continued, not restarted
    assert state2["history"][:2] == state1["history"]
    # Unshuffled, the same run (same budget, so the same rates) sees other rows from its first step on. An
    # untrained model's loss is nearly the same on any rows of this task (~1e-5 apart), but runs repeat to the
    # last digit (above): any difference is the rows'.
    in_order = _history(run_training(_config(packed_data, "in-order", max_steps=10, checkpoint_every=10)))
    assert in_order["history"][0]["loss"] != state1["history"][0]["loss"]
    # The optimizer state continued too: Adam's step counter is at 20 in the DeepSpeed checkpoint.
    ds_dir = Path(second.checkpoint.path) / DS_STATE_DIR / "state"
    optim_files = sorted(ds_dir.glob("*optim_states.pt"))
    assert optim_files
    optim = torch.load(optim_files[0], map_location="cpu", weights_only=False)
    steps = {int(s["step"]) for s in optim["optimizer_state_dict"]["base_optimizer_state"]["state"].values()}
    assert steps == {20}


def test_a_killed_worker_restarts_from_the_last_checkpoint_and_finishes(ray_local, packed_data):
    cfg = _config(packed_data, "fault", max_steps=20, checkpoint_every=5, fail_at_step=12, max_failures=2)
    result = run_training(cfg)
    assert result.error is None
    assert (Path(cfg.storage_path) / "fault" / FAULT_MARKER).exists()
    state = _history(result)
    assert state["step"] == 20 and state["micro_steps"] == 20
    # Steps 11-12 ran twice (before the crash and after resuming from step 10); logged steps are unique.
    assert [h["step"] for h in state["history"]] == [5, 10, 15, 20]


def _held_out_loss(model_dir, data_dir, cfg) -> float:
    """What eval_loss means, computed here in one process: the masked cross-entropy over the held-out
    rows, noised by the run's objective in micro-batches whose noise is seeded by their first row."""
    model = dllm.load_model(model_dir)
    table = pq.read_table(str(data_dir / "part-0.parquet"))
    ids, prompt, seg = (torch.tensor(table.column(c).to_pylist()) for c in ("input_ids", "prompt_mask", "segment_ids"))
    ce_sum = weight = 0.0
    with torch.no_grad():
        for lo in range(0, len(ids), cfg.micro_batch_size):
            rows = slice(lo, lo + cfg.micro_batch_size)
            noised = dllm.noise_batch(ids[rows], prompt[rows].bool(), seg[rows],
                                      mask_token_id=model.config.mask_token_id,
                                      terminal_token_ids=model.config.stop_token_ids, t_min=cfg.t_min,
                                      t_max=cfg.t_max, tail_mask_prob=cfg.tail_mask_prob,
                                      generator=torch.Generator().manual_seed(EVAL_SEED + lo))
            logits = model(noised.input_ids)
            n = int(noised.loss_mask.sum())
            ce_sum += float(dllm.diffusion_loss(logits, noised.targets, noised.loss_mask)) * n
            weight += n
    return ce_sum / weight


def test_held_out_rows_are_scored_at_each_checkpoint_on_the_same_noise(ray_local, packed_data, char_tokenizer,
                                                                        tmp_path):
    """eval_data is scored at every checkpoint and at the end, by both workers together (rows split
    between them, the last micro-batch partial): each reported eval_loss is the checkpoint's masked
    cross-entropy on the held-out rows, on the same noise at both evaluations."""
    held = _write_packed(tmp_path, char_tokenizer, n=70, seed=1) / "data"
    n_rows = pq.read_table(str(held / "part-0.parquet")).num_rows
    assert n_rows % 8  # 2 workers x 4 rows: the last batch leaves one worker short
    cfg = _config(packed_data, "held-out", max_steps=20, eval_data=str(held))
    result = run_training(cfg)
    assert result.error is None
    history = _history(result)["history"]
    assert [h["step"] for h in history if "eval_loss" in h] == [10, 20]  # with the checkpoints only
    assert result.metrics["eval_rows"] == n_rows
    assert len(result.best_checkpoints) == 2
    for checkpoint, metrics in result.best_checkpoints:
        expected = _held_out_loss(Path(checkpoint.path) / "hf", held, cfg)
        assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-4)
    first, last = (h["eval_loss"] for h in history if "eval_loss" in h)
    assert last < first  # the same noise both times: the model's progress alone

    # eval_every: every 5 steps, and the end of an epochs-bounded run (its final checkpoint) too
    cfg = _config(packed_data, "held-out-every", max_steps=None, epochs=1, eval_data=str(held), eval_every=5,
                  checkpoint_every=100)
    result = run_training(cfg)
    assert result.error is None
    state = _history(result)
    assert [h["step"] for h in state["history"] if "eval_loss" in h] == [5, 10] and state["step"] > 10
    assert result.metrics["step"] == state["step"] and result.metrics["eval_rows"] == n_rows
    assert result.metrics["eval_loss"] == pytest.approx(_held_out_loss(final_model_dir(result), held, cfg), rel=1e-4)


def test_the_rate_warms_up_then_decays_over_whichever_budget_ends_first():
    rate = dict(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(schedule="cosine", step=5, progress=0.0, **rate) == pytest.approx(0.5)  # warming up
    assert learning_rate(schedule="cosine", step=10, progress=0.0, **rate) == pytest.approx(1.0)
    assert learning_rate(schedule="cosine", step=50, progress=0.5, **rate) == pytest.approx(0.55)
    assert learning_rate(schedule="cosine", step=99, progress=1.0, **rate) == pytest.approx(0.1)
    assert learning_rate(schedule="constant", step=99, progress=1.0, **rate) == 1.0
    # A time limit that runs out before max_steps drives the decay; so do steps when they end first.
    assert run_progress(100, 30.0, total_steps=1000, time_limit_s=60.0) == 0.5
    assert run_progress(900, 30.0, total_steps=1000, time_limit_s=60.0) == 0.9
    assert run_progress(5, 99.0, total_steps=None, time_limit_s=60.0) == 1.0
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        learning_rate(schedule="linear", step=1, progress=0.0, **rate)


def test_config_errors_are_clear(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"run_name": "x", "data": "d", "model": "m", "max_steps": 1, "learning_rate": 1})
    with pytest.raises(ConfigError, match="exactly one of 'model'"):
        TrainConfig(run_name="x", data="d", max_steps=1)
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(run_name="x", data="d", model="m", max_steps=1, precision="fp16")
    with pytest.raises(ConfigError, match="fp8 needs use_gpu"):
        TrainConfig(run_name="x", data="d", model="m", max_steps=1, fp8=True)
    with pytest.raises(ConfigError, match="max_steps' or 'epochs"):
        TrainConfig(run_name="x", data="d", model="m")
    with pytest.raises(ConfigError, match=r"lr_schedule='step' is invalid; expected one of \['constant', 'cosine'\]"):
        TrainConfig(run_name="x", data="d", model="m", max_steps=1, lr_schedule="step")
    with pytest.raises(ConfigError, match=r"loss_weighting='sqrt' is invalid; expected one of \['mean', 'inverse_t', 'per_sample'\]"):
        TrainConfig(run_name="x", data="d", model="m", max_steps=1, loss_weighting="sqrt")
    with pytest.raises(ConfigError, match=r"pad_eos_weight=2 is invalid; expected a weight in \[0, 1\]"):
        TrainConfig(run_name="x", data="d", model="m", max_steps=1, pad_eos_weight=2)
    with pytest.raises(ConfigError, match=r"cut_answer_prob=1.5 is invalid; expected a fraction in \[0, 1\]"):
        TrainConfig(run_name="x", data="d", model="m", max_steps=1, cut_answer_prob=1.5)
    with pytest.raises(ConfigError, match=r"shuffle_buffer_rows=-1 is invalid; expected an integer >= 0"):
        TrainConfig(run_name="x", data="d", model="m", max_steps=1, shuffle_buffer_rows=-1)
    with pytest.raises(ConfigError, match="tail_eos needs tail_mask_prob"):
        TrainConfig(run_name="x", data="d", model="m", max_steps=1, tail_eos=True)
    with pytest.raises(ConfigError, match="eval_every needs eval_data"):
        TrainConfig(run_name="x", data="d", model="m", max_steps=1, eval_every=5)
    with pytest.raises(ConfigError, match=r"eval_every=0 is invalid; expected an integer >= 1"):
        TrainConfig(run_name="x", data="d", model="m", max_steps=1, eval_data="e", eval_every=0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run_name: x\ndata: d\nmodel: m\nmax_steps: 1\nbogus: 2\n")
    assert main(["--config", str(cfg)]) == 2
    assert "bogus" in capsys.readouterr().err


def test_ray_trains_line_per_report_is_kept_out_of_the_workers_log():
    """Ray Train logs each worker's every report (its metrics dict) at INFO; the worker raises that
    logger to WARNING. The logger checked is the one Ray's report path uses."""
    import logging

    from ray.train.v2._internal.execution import context

    from train.loop import quiet_report_log

    assert context.logger is logging.getLogger(context.__file__)
    level = context.logger.level
    try:
        quiet_report_log()
        assert not context.logger.isEnabledFor(logging.INFO) and context.logger.isEnabledFor(logging.WARNING)
    finally:
        context.logger.setLevel(level)


_GATHER_AFTER_ENGINE = """
import os, warnings, torch, dllm
from benchmarks.fp8_train_bench import init_single_process_group
from train.config import TrainConfig
from train.loop import deepspeed_engine

init_single_process_group("cpu")
cfg = TrainConfig(run_name="x", data="d", model_config={}, tokenizer="t", max_steps=1, num_workers=1, use_gpu=False)
tiny = dllm.tiny_config(64, n_layers=1, mask_token_id=63, eos_token_id=62, eot_token_id=61, bos_token_id=60,
                        pad_token_id=62)
deepspeed_engine(dllm.build_model(tiny, device="cpu", seed=0), cfg, on_gpu=False)
with warnings.catch_warnings(record=True) as seen:
    for _ in range(3):  # as ZeRO does after every optimizer step with more than one worker
        torch.distributed.all_gather_into_tensor(torch.empty(2), torch.ones(2))
print([str(w.message) for w in seen], flush=True)
torch.distributed.destroy_process_group()
os._exit(0)  # what is checked is printed; a native thread still joinable at teardown once aborted the exit
"""


def test_a_workers_log_is_not_buried_under_torchs_all_gather_deprecation_warning():
    """ZeRO calls a torch.distributed API that torch 2.13 deprecates; unfiltered, each worker printed its
    FutureWarning at every step of the quickstart's training log."""
    done = subprocess.run([sys.executable, "-c", _GATHER_AFTER_ENGINE], cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "all_gather_into_tensor" not in done.stderr
