"""How soon a stream shows text: whole blocks against each block's settled prefix (GenerationConfig.stream_settled).

    python -m benchmarks.streaming_bench --model CKPT --prompts-jsonl heldout.jsonl [--block-size 32] [--batch 8]

The same prompts decoded twice on one engine configuration, streaming finished blocks only, then the settled prefix
as it grows. Per request: the step (exact) and the seconds from submission to its first streamed token, and the
number of chunks its answer came in; the answers must be the same. Reported: p50 / p90 of the first token's steps
and seconds, chunks per answer, output tokens/s (the settled prefixes cost a small host read per step), and the
ratios. Without --model a random model (its positions settle in random order: little prefix to show early).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dllm
from benchmarks.engine_bench import build_random_model, load_prompts
from benchmarks.report import write_json
from benchmarks.stats import percentile


def run_mode(engine, prompts: list[list[int]], cfg: dllm.GenerationConfig, batch: int) -> dict:
    """Decode the prompts `batch` at a time; the first token's step and seconds and the chunks of each answer."""
    first_steps, first_secs, chunks, answers, tokens = [], [], [], [], 0
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch):
        ids = {engine.add_request(p, cfg): k for k, p in enumerate(prompts[start:start + batch])}
        submitted, step = time.perf_counter(), 0
        first, count, done = {}, dict.fromkeys(ids, 0), {}
        while len(done) < len(ids):
            for out in engine.step():
                if out.new_token_ids:
                    count[out.request_id] += 1
                    first.setdefault(out.request_id, (step + 1, time.perf_counter() - submitted))
                if out.finished:
                    done[out.request_id] = out.generation.token_ids
            step += 1
        for rid in ids:  # an empty answer has no first token: it counts when it ends
            s, secs = first.get(rid, (step, time.perf_counter() - submitted))
            first_steps.append(s)
            first_secs.append(secs)
            chunks.append(count[rid])
            answers.append(done[rid])
            tokens += len(done[rid])
    seconds = time.perf_counter() - t0
    return {"first_token_p50_steps": statistics.median(first_steps), "first_token_p90_steps": percentile(first_steps, 0.9),
            "first_token_p50_s": statistics.median(first_secs), "first_token_p90_s": percentile(first_secs, 0.9),
            "chunks_per_answer": statistics.mean(chunks), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "answers": answers}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: a random model)")
    p.add_argument("--prompts-jsonl", help="Alpaca-style jsonl whose instruction+input are the prompts")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32, help="random prompts' length (without --prompts-jsonl)")
    p.add_argument("--batch", type=int, default=8, help="requests decoded together")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--decoder", default="threshold", choices=list(dllm.engine.DECODERS))
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.model:
        model, tokenizer = dllm.load_model(args.model, device=args.device, dtype=dtype), dllm.load_tokenizer(args.model)
    else:
        model, tokenizer = build_random_model(args).to(args.device, dtype), None
    prompts = load_prompts(args, model, tokenizer)
    engine = dllm.Engine(model, tokenizer, max_batch_size=args.batch, prefix_caching=False,
                         max_model_len=max(map(len, prompts)) + args.max_new_tokens + 2 * args.block_size)
    cfg = dllm.GenerationConfig(block_size=args.block_size, threshold=args.threshold, decoder=args.decoder,
                                max_new_tokens=args.max_new_tokens, early_stop=True)
    engine.generate(prompts[:args.batch], cfg)  # warm-up
    rows = {}
    for mode, settled in (("blocks", False), ("settled", True)):
        rows[mode] = run_mode(engine, prompts, cfg.replace(stream_settled=settled), args.batch)
    if rows["blocks"].pop("answers") != rows["settled"].pop("answers"):
        raise SystemExit("streaming the settled prefixes changed an answer")
    blocks, settled = rows["blocks"], rows["settled"]
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "args": vars(args),
              "rows": rows,
              "first_token_p50_steps_blocks_over_settled": blocks["first_token_p50_steps"] / settled["first_token_p50_steps"],
              "first_token_p50_s_blocks_over_settled": blocks["first_token_p50_s"] / settled["first_token_p50_s"],
              "tokens_per_s_settled_over_blocks": settled["tokens_per_s"] / blocks["tokens_per_s"]}
    print(f"{'stream':>8} {'first token p50 / p90 steps':>28} {'p50 / p90 s':>16} {'chunks/answer':>13} {'tok/s':>8}")
    for mode, r in rows.items():
        print(f"{mode:>8} {r['first_token_p50_steps']:>13.1f} / {r['first_token_p90_steps']:<12.1f} "
              f"{r['first_token_p50_s']:7.3f} / {r['first_token_p90_s']:<6.3f} {r['chunks_per_answer']:13.1f} "
              f"{r['tokens_per_s']:8.1f}")
    print(f"first token p50: {result['first_token_p50_steps_blocks_over_settled']:.2f}x sooner in steps, "
          f"{result['first_token_p50_s_blocks_over_settled']:.2f}x in seconds; tok/s settled / blocks "
          f"{result['tokens_per_s_settled_over_blocks']:.2f}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
