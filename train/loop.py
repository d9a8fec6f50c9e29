"""What each Ray Train worker runs: DeepSpeed ZeRO-2 SFT with the dLLM-Var objective (or, with
`objective: trajectory`, trajectory compression's compressed transitions).

Data order is deterministic: every worker walks the packed rows in file order in global batches of
num_workers * micro_batch_size rows and takes its own slice. Optimizer step s therefore always sees
the same rows, which makes resuming exact: a restarted run skips the micro-batches its checkpoint
already consumed, repeating and skipping nothing.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

import dllm
from dllm.trajectory import ROW_COLUMNS, Trajectory, transition_batch

from .config import TrainConfig
from .schedule import epoch_steps, learning_rate, run_progress

DS_STATE_DIR = "deepspeed"  # inside a Ray Train checkpoint: DeepSpeed's resumable state
HF_DIR = "hf"  # inside a Ray Train checkpoint: a checkpoint directory dllm.load_model reads
DS_TAG = "state"
FAULT_MARKER = "injected-fault-done"
EVAL_SEED = 7_919  # + a held-out micro-batch's first row index: its noise, the same at every evaluation


def build_model(cfg: TrainConfig, tokenizer) -> dllm.LLaDAModelLM:
    if cfg.model:
        return dllm.load_model(cfg.model, dtype=torch.float32).train()
    special = dllm.special_ids(tokenizer)
    raw = {"vocab_size": len(tokenizer), "embedding_size": len(tokenizer), **special, **cfg.model_config}
    return dllm.build_model(dllm.LLaDAConfig.from_dict(raw), seed=cfg.seed).train()


def enable_fp8(model: torch.nn.Module) -> None:
    """Swap the transformer's linears for torchao float8 (E4M3, tensorwise scales) training linears."""
    if not torch.cuda.is_available():
        raise RuntimeError("fp8 training needs a CUDA GPU; this worker has none")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise RuntimeError(f"fp8 training needs compute capability >= 8.9 (Ada/Hopper); this GPU is {major}.{minor}")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise RuntimeError("fp8 training needs torchao (pip install 'dllm-ray[gpu]')") from e

    def wanted(module: torch.nn.Module, fqn: str) -> bool:
        # Blocks' projections only: the embedding is no linear and the LM head runs on few rows.
        return isinstance(module, torch.nn.Linear) and ".blocks." in fqn and module.in_features % 16 == 0 \
            and module.out_features % 16 == 0

    convert_to_float8_training(model, module_filter_fn=wanted)


def deepspeed_config(cfg: TrainConfig, on_gpu: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage, "overlap_comm": on_gpu, "contiguous_gradients": True},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay,
            "torch_adam": not on_gpu}},  # FusedAdam would JIT-compile for minutes on CPU
        # No DeepSpeed scheduler: the loop sets the rate from train.schedule (it needs the elapsed time).
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def deepspeed_engine(model: dllm.LLaDAModelLM, cfg: TrainConfig, on_gpu: bool):
    """The model under DeepSpeed as `cfg` asks (ZeRO stage, bf16, AdamW; FP8 linears, compiled, with
    `fp8`). Needs torch.distributed initialised (Ray Train does it; a single process may do it itself)."""
    import deepspeed

    _skip_cpu_shm_build()
    # ZeRO gathers parameters with torch.distributed.all_gather_into_tensor, deprecated in torch 2.13:
    # its FutureWarning, printed by every worker at every step, would bury the training log.
    warnings.filterwarnings("ignore", message="`torch.distributed.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    if cfg.fp8:
        model = model.cuda()
        enable_fp8(model)
        # Eager, the float8 casts and scales are separate kernels: measured 0.52x bf16's tokens/s on an
        # H100 (benchmarks.fp8_train_bench); compiled, 1.29x. Module.compile keeps the parameter names.
        model.compile()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(cfg, on_gpu))
    engine.module.enable_flash_attn()  # CUDA + bf16 + flash-attn installed; SDPA otherwise
    return engine


def _skip_cpu_shm_build() -> None:
    """DeepSpeed JIT-builds a shared-memory comm op on CPU (a minute on 2 cores); gloo is enough."""
    from deepspeed.accelerator import get_accelerator
    import deepspeed.ops

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__[get_accelerator().create_op_builder("ShareMemCommBuilder").NAME] = False


def quiet_report_log() -> None:
    """Ray Train logs every ray.train.report of every worker at INFO, the whole metrics dict on one long
    line: two per logged step with two workers, burying the training log (rank 0's progress line says
    the same). Its logger is named after its module's file; a Ray without that module logs as before."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict) -> None:
    """loop_config: {"config": TrainConfig as a dict, "dataset_rows": rows in the training data (None when
    max_steps bounds the run)}."""
    import ray.train
    from ray.train import Checkpoint

    quiet_report_log()

    cfg = TrainConfig.from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    on_gpu = cfg.use_gpu and torch.cuda.is_available()
    torch.manual_seed(cfg.seed)

    tokenizer = dllm.load_tokenizer(cfg.tokenizer_dir)
    model = build_model(cfg, tokenizer)
    config = model.config
    engine = deepspeed_engine(model, cfg, on_gpu)
    device = engine.device

    state = {"step": 0, "micro_steps": 0, "samples_seen": 0, "tokens_seen": 0, "elapsed": 0.0, "history": []}
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            _, client = engine.load_checkpoint(str(Path(d) / DS_STATE_DIR), tag=DS_TAG)
        client = client or {}
        state.update({k: client[k] for k in state if k in client})  # DeepSpeed adds keys of its own
        if rank == 0:
            print(f"[train] resumed at step {state['step']} (samples seen {state['samples_seen']})", flush=True)

    shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if cfg.eval_data else None
    rows_per_micro = world * cfg.micro_batch_size
    micro_per_epoch = None
    total_steps = cfg.max_steps
    budget_steps = total_steps or epoch_steps(loop_config["dataset_rows"], rows_per_micro, cfg.grad_accum, cfg.epochs)

    def set_learning_rate() -> None:  # for the coming optimizer step; equal on every rank (agreed elapsed time)
        progress = run_progress(state["step"], state["elapsed"], budget_steps, cfg.time_limit_s)
        lr = learning_rate(lr=cfg.lr, schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps,
                           min_lr_ratio=cfg.min_lr_ratio, step=state["step"] + 1, progress=progress)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr

    set_learning_rate()
    stop_tokens = config.stop_token_ids
    t_start = time.time() - state["elapsed"]
    t_log, tokens_log = time.time(), 0
    # This rank's [loss sum, samples] since the last log, added up on the device: read (and summed over the
    # ranks) only when logging, so no micro-step waits for the device.
    pending = torch.zeros(2, dtype=torch.float64, device=device)
    losses_pending = 0  # micro-steps in pending's loss sum

    def drain_pending() -> float:
        """Add the samples since the last call to state["samples_seen"]; return the mean loss over them."""
        nonlocal losses_pending
        totals = pending.clone()
        if world > 1:
            torch.distributed.all_reduce(totals)
        loss_sum, samples = totals.tolist()
        state["samples_seen"] += int(samples)
        mean = loss_sum / max(1, losses_pending * world)
        pending.zero_()
        losses_pending = 0
        return mean

    def save_checkpoint(metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(str(Path(tmp) / DS_STATE_DIR), tag=DS_TAG, client_state=dict(state))
            if rank == 0:
                hf = dllm.save_pretrained(engine.module, tokenizer, Path(tmp) / HF_DIR)
                (hf / "trainer_state.json").write_text(json.dumps({"config": cfg.to_dict(), **state}, indent=2))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))

    def batches_of(data, drop_last: bool, epoch: int | None = None):
        """Micro-batches of all ranks' rows (each rank takes its slice); an epoch's drawn at random from
        shuffle_buffer_rows rows, alike on every rank (the seed is theirs in common)."""
        order = {}
        if epoch is not None and cfg.shuffle_buffer_rows:
            order = {"local_shuffle_buffer_size": cfg.shuffle_buffer_rows,
                     "local_shuffle_seed": cfg.seed * 1_000_003 + epoch}
        if cfg.objective == "trajectory":
            return data.iter_batches(batch_size=rows_per_micro, drop_last=drop_last, batch_format="numpy", **order)
        return data.iter_torch_batches(batch_size=rows_per_micro, drop_last=drop_last, **order,
                                       dtypes={"input_ids": torch.long, "prompt_mask": torch.bool,
                                               "segment_ids": torch.int32})

    def noised_rows(batch, lo: int, hi: int, gen: torch.Generator):
        """Rows lo:hi of a batch as the objective's inputs on the device: (NoisedBatch, the attention mask
        or None, the number of samples they hold)."""
        if cfg.objective == "trajectory":
            trajs = [Trajectory.from_row({c: batch[c][i] for c in ROW_COLUMNS}) for i in range(lo, hi)]
            noised = transition_batch(trajs, mask_token_id=config.mask_token_id,
                                      pad_token_id=config.pad_token_id or 0, generator=gen)
            noised = noised.to(device)
            return noised, None, len(trajs)
        ids = batch["input_ids"][lo:hi].to(device)
        prompt = batch["prompt_mask"][lo:hi].to(device)
        seg = batch["segment_ids"][lo:hi].to(device)
        if cfg.seq_len and ids.shape[1] != cfg.seq_len:
            raise ValueError(f"packed rows have {ids.shape[1]} tokens but the config says seq_len={cfg.seq_len}")
        noised = dllm.noise_batch(ids, prompt, seg, mask_token_id=config.mask_token_id,
                                  terminal_token_ids=stop_tokens, t_min=cfg.t_min, t_max=cfg.t_max,
                                  tail_mask_prob=cfg.tail_mask_prob, generator=gen,
                                  tail_target_id=config.eos_token_id if cfg.tail_eos else None,
                                  pad_eos_weight=cfg.pad_eos_weight, cut_answer_prob=cfg.cut_answer_prob)
        mask = noised.attention_mask(documents=cfg.document_mask)
        return noised, mask, seg.amax(1).sum()  # sample pieces: each row's segments are numbered 1, 2, ...

    def evaluate() -> dict:
        """The held-out rows' masked cross-entropy (weighted as pad_eos_weight says, over every masked
        position; the objective's loss under loss_weighting "mean"), each rank scoring its slices. A
        micro-batch's noise is seeded by its first row's index in the data: the same at every evaluation."""
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # weighted CE, weight, rows
        head = engine.module.model.transformer["ff_out"]
        with torch.no_grad():
            for k, batch in enumerate(batches_of(eval_shard, drop_last=False)):
                lo = rank * cfg.micro_batch_size
                hi = min(lo + cfg.micro_batch_size, len(batch[next(iter(batch))]))
                if lo >= hi:
                    continue  # the last, partial batch has no rows for this rank
                noised, mask, _ = noised_rows(batch, lo, hi, torch.Generator().manual_seed(
                    EVAL_SEED + k * rows_per_micro + lo))
                hidden = engine(noised.input_ids, attention_mask=mask, return_hidden=True)
                loss = dllm.diffusion_loss_from_hidden(hidden, head, noised.targets, noised.loss_mask,
                                                       weights=noised.weights)
                weight = noised.loss_mask.sum() if noised.weights is None else noised.weights[noised.loss_mask].sum()
                sums += torch.stack([loss.double() * weight, weight.double(),
                                     torch.tensor(hi - lo, dtype=torch.float64, device=device)])
        if world > 1:
            torch.distributed.all_reduce(sums)
        ce, weight, rows = sums.tolist()
        return {"eval_loss": ce / weight if weight else float("nan"), "eval_rows": int(rows)}

    epoch = 0  # a resumed run skips whole epochs below until it reaches its micro-step
    done = False
    while not done:
        seen_this_epoch = 0
        skip = state["micro_steps"] - (epoch * micro_per_epoch if micro_per_epoch else 0)
        for batch in batches_of(shard, drop_last=True, epoch=epoch):
            seen_this_epoch += 1
            if seen_this_epoch <= skip:
                continue  # consumed before the checkpoint this run resumed from
            lo = rank * cfg.micro_batch_size
            # Noise depends only on (seed, micro step, rank): identical after a resume.
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + state["micro_steps"] * 997 + rank)
            noised, mask, samples = noised_rows(batch, lo, lo + cfg.micro_batch_size, gen)
            ids = noised.input_ids
            pending[1] += samples
            hidden = engine(noised.input_ids, attention_mask=mask, return_hidden=True)
            loss = dllm.diffusion_loss_from_hidden(hidden, engine.module.model.transformer["ff_out"], noised.targets,
                                                   noised.loss_mask, noised.t, cfg.loss_weighting, noised.segment_ids,
                                                   noised.weights)
            engine.backward(loss)
            engine.step()
            state["micro_steps"] += 1
            pending[0] += loss.detach()
            losses_pending += 1
            tokens_log += ids.numel() * world
            if state["micro_steps"] % cfg.grad_accum:
                continue
            state["step"] += 1
            state["tokens_seen"] += ids.numel() * world * cfg.grad_accum
            state["elapsed"] = time.time() - t_start
            if cfg.time_limit_s is not None and world > 1:  # ranks agree on the clock: same stop step, same rate
                clock = torch.tensor([state["elapsed"]], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(clock, op=torch.distributed.ReduceOp.MAX)
                state["elapsed"] = float(clock.item())
            step = state["step"]

            if cfg.fail_at_step == step and rank == world - 1:
                marker = Path(cfg.storage_path) / cfg.run_name / FAULT_MARKER
                if not marker.exists():
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.write_text("the test hook killed a worker here once")
                    os._exit(1)  # a worker dies abruptly, as a lost node would

            last = (total_steps is not None and step >= total_steps) or (
                cfg.time_limit_s is not None and state["elapsed"] >= cfg.time_limit_s)
            saving = step % cfg.checkpoint_every == 0 or last
            evaluating = eval_shard is not None and (last or (step % cfg.eval_every == 0 if cfg.eval_every else saving))
            if step % cfg.log_every == 0 or saving or evaluating:
                now, mean_loss = time.time(), drain_pending()  # before samples_seen is read: it adds the pending ones
                metrics = {"step": step, "loss": mean_loss, "lr": engine.get_lr()[0],
                           "tokens_per_s": tokens_log / max(1e-9, now - t_log), "samples_seen": state["samples_seen"],
                           "tokens_seen": state["tokens_seen"], "elapsed_s": state["elapsed"], "epoch": epoch}
                if evaluating:
                    metrics.update(evaluate())
                t_log, tokens_log = time.time(), 0  # the next window's tokens/s leaves the evaluation out
                state["history"].append({k: metrics[k] for k in ("step", "loss", "lr", "tokens_per_s", "eval_loss")
                                         if k in metrics})
                if rank == 0:
                    of = f"/{total_steps}" if total_steps else ""
                    held_out = f" eval_loss {metrics['eval_loss']:.4f}" if evaluating else ""
                    print(f"[train] step {step}{of} loss {metrics['loss']:.4f}{held_out} lr {metrics['lr']:.2e} "
                          f"{metrics['tokens_per_s']:.0f} tok/s elapsed {metrics['elapsed_s']:.0f}s", flush=True)
                if saving:
                    save_checkpoint(metrics)
                else:
                    ray.train.report(metrics)
            if last:
                done = True
                break
            set_learning_rate()
        if micro_per_epoch is None:
            micro_per_epoch = seen_this_epoch
            if micro_per_epoch == 0:
                raise ValueError(f"the training data has fewer than num_workers*micro_batch_size = {rows_per_micro} rows")
        if done:
            break
        epoch += 1
        if cfg.epochs is not None and epoch >= cfg.epochs:
            if state["step"] % cfg.checkpoint_every:  # the final state, unless just saved
                drain_pending()
                save_checkpoint({"step": state["step"], "epoch": epoch, "samples_seen": state["samples_seen"],
                                 "tokens_seen": state["tokens_seen"], "elapsed_s": state["elapsed"],
                                 **(evaluate() if eval_shard is not None else {})})
            break
