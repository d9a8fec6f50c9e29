"""FP8 (torchao float8, E4M3 tensorwise) vs bf16 training steps of the dLLM-Var objective, on a
slice of LLaDA-8B (its layer shape, fewer layers): the path `train` takes with `fp8: true`.

    python -m benchmarks.fp8_train_bench [--layers 4] [--steps 12] [--compile] [--json out.json]
    python -m benchmarks.fp8_train_bench --deepspeed [--compile]     # the train loop's own engine

Both runs: the same initial weights, the same noised batches, AdamW; the FP8 run swaps the blocks'
linears with `train.loop.enable_fp8`. Reported: tokens/s of a training step (forward + backward +
optimizer; median of the timed steps), the ratio FP8 / bf16, the loss of both runs step by step,
and how many linears run in FP8. Plain: bf16 weights and torch AdamW; with `--compile` both models
run under torch.compile (torchao fuses its scaling casts there). With `--deepspeed`: each model goes
through `train.loop.deepspeed_engine`, the exact setup of a training worker (ZeRO-2, bf16 with fp32
master weights, FP8 runs compiled), in one process without Ray; `--compile` then compiles the bf16
model too. `--device cpu --precisions bf16` runs that path on a CPU (DeepSpeed over gloo).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch

from benchmarks.report import write_json
import dllm
from train.config import TrainConfig
from train.loop import deepspeed_engine, enable_fp8


def slice_config(layers: int, vocab: int, d_model: int = 4096) -> dllm.LLaDAConfig:
    """LLaDA-8B's layer shape (head dim 128, MLP 3 d_model) at `d_model`, `layers` deep."""
    return dllm.LLaDAConfig(n_layers=layers, d_model=d_model, n_heads=d_model // 128, n_kv_heads=d_model // 128,
                            mlp_hidden_size=3 * d_model, vocab_size=vocab, embedding_size=vocab,
                            mask_token_id=vocab - 2, eos_token_id=vocab - 1, eot_token_id=None, bos_token_id=None,
                            pad_token_id=vocab - 1)


def batches(cfg, args):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.steps):
        ids = torch.randint(0, cfg.vocab_size - 2, (args.batch, args.seq_len), generator=gen)
        prompt = torch.zeros_like(ids)
        prompt[:, : args.seq_len // 4] = 1
        seg = torch.ones_like(ids)
        out.append(dllm.noise_batch(ids, prompt, seg, mask_token_id=cfg.mask_token_id,
                                    terminal_token_ids=cfg.stop_token_ids, generator=gen))
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def objective_loss(model, hidden: torch.Tensor, nb, device: str) -> torch.Tensor:
    return dllm.diffusion_loss_from_hidden(hidden, model.model.transformer["ff_out"], nb.targets.to(device),
                                           nb.loss_mask.to(device))


class PlainStep:
    """bf16 weights, torch AdamW, optionally torch.compile: the kernels alone."""

    def __init__(self, precision: str, cfg, args) -> None:
        self.model = dllm.build_model(cfg, device=args.device, dtype=torch.bfloat16, seed=0).train()
        if precision == "fp8":
            enable_fp8(self.model)
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=args.device == "cuda")
        self.compiled = args.compile
        self.zero_stage = None

    def __call__(self, nb, device: str) -> torch.Tensor:
        loss = objective_loss(self.model, self.forward(nb.input_ids.to(device), return_hidden=True), nb, device)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss


class DeepSpeedStep:
    """The training worker's engine (train.loop.deepspeed_engine) and its backward/step calls."""

    def __init__(self, precision: str, cfg, args) -> None:
        on_gpu = args.device == "cuda"
        train_cfg = TrainConfig(run_name="fp8_train_bench", data="(synthetic batches)", model_config={},
                                tokenizer="(none)", micro_batch_size=args.batch, max_steps=args.steps, lr=1e-4, num_workers=1,
                                use_gpu=on_gpu, fp8=precision == "fp8", zero_stage=2)
        model = dllm.build_model(cfg, device=args.device, seed=0).train()  # fp32: DeepSpeed keeps the master copy
        if args.compile and precision == "bf16":
            model.compile()  # FP8 runs are compiled by deepspeed_engine, as in training
        self.engine = deepspeed_engine(model, train_cfg, on_gpu)
        self.model = self.engine.module
        self.compiled = args.compile or precision == "fp8"
        self.zero_stage = self.engine.zero_optimization_stage()

    def __call__(self, nb, device: str) -> torch.Tensor:
        loss = objective_loss(self.model, self.engine(nb.input_ids.to(device), return_hidden=True), nb, device)
        self.engine.backward(loss)
        self.engine.step()
        return loss


def init_single_process_group(device: str) -> None:
    """DeepSpeed needs torch.distributed; Ray Train sets it up for a worker, here one process does."""
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def run(precision: str, cfg, data, args) -> dict:
    torch.manual_seed(0)
    step = (DeepSpeedStep if args.deepspeed else PlainStep)(precision, cfg, args)
    fp8_linears = sum(type(m).__name__ == "Float8Linear" for m in step.model.modules())
    losses, times = [], []
    for nb in data:
        sync(args.device)
        t0 = time.perf_counter()
        loss = step(nb, args.device)
        sync(args.device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    timed = times[args.warmup:]
    step_s = statistics.median(timed)
    tokens = args.batch * args.seq_len
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    result = {"precision": precision, "deepspeed": args.deepspeed, "zero_stage": step.zero_stage,
              "compiled": step.compiled, "fp8_linears": fp8_linears,
              "step_s": step_s, "tokens_per_s": tokens / step_s, "losses": losses, "peak_gib": peak}
    del step
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(f"{precision}{' deepspeed' if args.deepspeed else ''}{' compiled' if result['compiled'] else ''}: "
          f"{tokens / step_s:,.0f} tok/s, step {step_s * 1e3:.1f} ms, {fp8_linears} FP8 linears, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--d-model", type=int, default=4096, help="LLaDA-8B's 4096; smaller for CPU smoke runs")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--deepspeed", action="store_true", help="through train.loop.deepspeed_engine (ZeRO-2)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--precisions", nargs="+", choices=["bf16", "fp8"], default=["bf16", "fp8"])
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fp8_train_bench needs a CUDA GPU of compute capability >= 8.9 (or --device cpu "
                         "--precisions bf16 for the bf16 path alone)")
    if args.device == "cpu" and "fp8" in args.precisions:
        raise SystemExit("--device cpu runs bf16 only (--precisions bf16): FP8 linears need a Hopper-class GPU")
    if args.d_model % 128:
        raise SystemExit(f"--d-model must be a multiple of 128 (head dim 128), got {args.d_model}")
    if args.deepspeed:
        init_single_process_group(args.device)
    cfg = slice_config(args.layers, args.vocab, args.d_model)
    data = batches(cfg, args)
    results = [run(precision, cfg, data, args) for precision in args.precisions]
    out = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "args": vars(args),
           "runs": results}
    if len(results) == 2:
        ratio = results[1]["tokens_per_s"] / results[0]["tokens_per_s"]
        gap = max(abs(a - b) / abs(a) for a, b in zip(results[0]["losses"], results[1]["losses"]))
        print(f"FP8 / bf16 tokens/s: {ratio:.2f}x; largest relative loss difference over {args.steps} steps: {gap:.2%}")
        out.update(fp8_over_bf16=ratio, max_rel_loss_gap=gap)
    write_json(args.json, out)


if __name__ == "__main__":
    main()
