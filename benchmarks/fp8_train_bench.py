"""FP8 (torchao float8, E4M3 tensorwise) vs bf16 training steps of the dLLM-Var objective, on a
slice of LLaDA-8B (its layer shape, fewer layers): the path `train` takes with `fp8: true`.

    python -m benchmarks.fp8_train_bench [--layers 4] [--steps 12] [--json out.json]

Both runs: the same initial weights (bf16, as DeepSpeed's bf16 mode holds them), the same noised
batches, AdamW; the FP8 run swaps the blocks' linears with `train.loop.enable_fp8`. Reported:
tokens/s of a training step (forward + backward + optimizer; median of the timed steps), the
ratio FP8 / bf16, the loss of both runs step by step, and how many linears run in FP8. With
`--compile` both models also run under torch.compile (torchao fuses its scaling casts there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import dllm
from train.loop import enable_fp8


def slice_config(layers: int, vocab: int) -> dllm.LLaDAConfig:
    return dllm.LLaDAConfig(n_layers=layers, vocab_size=vocab, embedding_size=vocab, mask_token_id=vocab - 2,
                            eos_token_id=vocab - 1, eot_token_id=None, bos_token_id=None, pad_token_id=vocab - 1)


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


def run(precision: str, cfg, data, args) -> dict:
    torch.manual_seed(0)
    model = dllm.build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=0).train()
    fp8_linears = 0
    if precision == "fp8":
        enable_fp8(model)
        fp8_linears = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    forward = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    head = model.model.transformer["ff_out"]
    losses, times = [], []
    for nb in data:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hidden = forward(nb.input_ids.cuda(), return_hidden=True)
        loss = dllm.diffusion_loss_from_hidden(hidden, head, nb.targets.cuda(), nb.loss_mask.cuda())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    timed = times[args.warmup:]
    step_s = statistics.median(timed)
    tokens = args.batch * args.seq_len
    result = {"precision": precision, "compiled": args.compile, "fp8_linears": fp8_linears, "step_s": step_s,
              "tokens_per_s": tokens / step_s, "losses": losses, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    del model, opt, forward
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    print(f"{precision}{' compiled' if args.compile else ''}: {tokens / step_s:,.0f} tok/s, step {step_s * 1e3:.1f} ms, "
          f"{fp8_linears} FP8 linears, loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fp8_train_bench needs a CUDA GPU of compute capability >= 8.9")
    cfg = slice_config(args.layers, args.vocab)
    data = batches(cfg, args)
    results = [run("bf16", cfg, data, args), run("fp8", cfg, data, args)]
    ratio = results[1]["tokens_per_s"] / results[0]["tokens_per_s"]
    gap = max(abs(a - b) / abs(a) for a, b in zip(results[0]["losses"], results[1]["losses"]))
    print(f"FP8 / bf16 tokens/s: {ratio:.2f}x; largest relative loss difference over {args.steps} steps: {gap:.2%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), "runs": results,
                       "fp8_over_bf16": ratio, "max_rel_loss_gap": gap}, f, indent=2)


if __name__ == "__main__":
    main()
