"""dInfer's inference techniques, one table: decoder x threshold x cache policy x loop unrolling x stop order.

    python -m benchmarks.ablation_bench --model DIR --prompts-jsonl heldout.jsonl [--device cuda] [--json out.json]

On a trained checkpoint (the quickstart's, for example: `--model quickstart/checkpoint/hf
--prompts-jsonl quickstart/data/heldout.jsonl`) every combination decodes the same held-out prompts;
the table has exact match, self-stopping, TPF and TPS, and each row's TPS relative to the default
(threshold decoder, dLLM-Var cache, no unrolling) measured in the same run.

Thresholds (`--thresholds 0.7 0.9 0.99`) trade parallelism for accuracy: the threshold, credit and
hierarchical decoders run at each; factor and fixed_k have no threshold and run once.

Cache policies: dllm-var (committed K/V reused as is), vicinity (each step also recomputes the last
`--vicinity` committed tokens; a full refresh when a block starts), none (everything recomputed at
every step). Stop order: "last" (the engine's default, GenerationConfig.stops_last) commits a
stop token only once every position left of it is decided; "confidence" (the paper's) commits it
like any other token. Unrolling (k denoise steps per host sync) only pays off on a GPU, where a host sync
stalls the device; on a CPU its rows show that it changes no answer. `--quantizations none fp8` runs every
combination again with FP8 weights (Engine quantization="fp8"): what the weights' precision costs in
exact match, and gains in TPS (on a GPU; on a CPU FP8 matmuls are slower).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

import dllm
from benchmarks.checkpoint_args import add_checkpoint_arguments, load_checkpoint
from benchmarks.report import write_json
from dllm.quantization import QUANTIZATIONS


STOP_ORDERS = ("last", "confidence")  # GenerationConfig.stops_last on / off


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(args) -> list[dict]:
    model, tok, rows = load_checkpoint(args)
    rows = rows[: args.num_prompts]
    prompts = [r["instruction"] + r.get("input", "") for r in rows]
    results = []
    # quantising is one-way on the model: the unquantised rows run first
    runs = sorted(itertools.product(args.quantizations, args.unroll), key=lambda r: r[0] != "none")
    for quantization, unroll in runs:
        engine = dllm.Engine(model, tok, max_batch_size=args.batch, max_model_len=args.max_model_len,
                             max_unroll=unroll, expected_tpf=args.expected_tpf,
                             quantization=None if quantization == "none" else quantization,
                             prefix_caching=False)  # every setting decodes the same prompts: each pays its prefills
        engine.warmup([args.block_size])
        settings = [(d, tau) for d in args.decoders
                    for tau in (args.thresholds if d in dllm.engine.decoders.COMMIT_ABOVE_THRESHOLD else [None])]
        for (decoder, tau), policy, order in itertools.product(settings, args.policies, args.stop_orders):
            cfg = dllm.GenerationConfig(block_size=args.block_size, max_new_tokens=args.max_new_tokens,
                                        decoder=decoder, cache_policy=policy, vicinity=args.vicinity, early_stop=True,
                                        stops_last=order == "last")
            if tau is not None:
                cfg = cfg.replace(threshold=tau)
            engine.generate(prompts[: args.batch], cfg)  # warm-up
            sync()
            t0 = time.perf_counter()
            gens = []
            for i in range(0, len(prompts), args.batch):
                gens += engine.generate(prompts[i:i + args.batch], cfg)
            sync()
            secs = time.perf_counter() - t0
            tokens = sum(len(g.token_ids) for g in gens)
            results.append({
                "decoder": decoder, "threshold": tau, "cache_policy": policy, "stop_order": order, "unroll": unroll,
                "quantization": quantization, "prompts": len(gens),
                "exact_match": sum(g.text == r["output"] for g, r in zip(gens, rows)) / len(gens),
                "self_stopped": sum(g.finish_reason == "stop" for g in gens) / len(gens),
                "tpf": tokens / max(1, sum(g.num_forwards for g in gens)), "tps": tokens / secs, "seconds": secs})
            print(results[-1], flush=True)
    default = ("threshold", args.thresholds[0], "dllm-var", "last", 1, "none")
    base = next((r["tps"] for r in results if (r["decoder"], r["threshold"], r["cache_policy"], r["stop_order"],
                                               r["unroll"], r["quantization"]) == default), None)
    for r in results:
        r["tps_vs_default"] = r["tps"] / base if base else None
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p, "Alpaca-style jsonl with instruction/input/output")
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together (1 = one at a time)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.9],
                   help="commit thresholds to run; the first is the default row's")
    p.add_argument("--decoders", nargs="+", default=["threshold", "credit", "hierarchical"],
                   choices=list(dllm.engine.DECODERS))
    p.add_argument("--policies", nargs="+", default=list(dllm.engine.CACHE_POLICIES),
                   choices=list(dllm.engine.CACHE_POLICIES))
    p.add_argument("--vicinity", type=int, default=16)
    p.add_argument("--stop-orders", nargs="+", default=list(STOP_ORDERS), choices=list(STOP_ORDERS))
    p.add_argument("--unroll", type=int, nargs="+", default=[1, 4] if torch.cuda.is_available() else [1])
    p.add_argument("--expected-tpf", type=float, default=4.0)
    p.add_argument("--quantizations", nargs="+", default=["none"], choices=["none", *QUANTIZATIONS],
                   help="weights as loaded (none) and/or quantised (fp8); the default row is unquantised")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    results = run(args)
    print(f"\n{'decoder':13} {'tau':>5} {'cache':9} {'stops':10} {'unroll':>6} {'weights':>7} {'EM':>6} {'stop':>5} "
          f"{'TPF':>6} {'tok/s':>8} {'vs default':>10}")
    for r in results:
        ratio = f"{r['tps_vs_default']:.2f}x" if r["tps_vs_default"] else "-"
        tau = "-" if r["threshold"] is None else f"{r['threshold']:.2f}"
        print(f"{r['decoder']:13} {tau:>5} {r['cache_policy']:9} {r['stop_order']:10} {r['unroll']:6d} "
              f"{r['quantization']:>7} {r['exact_match']:6.1%} {r['self_stopped']:5.0%} {r['tpf']:6.2f} "
              f"{r['tps']:8.1f} {ratio:>10}")
    write_json(args.json, {"device": args.device, "results": results})


if __name__ == "__main__":
    main()
