"""The pool-attention kernel's launch (queries per program, keys per step, key chunks) swept at
LLaDA-8B's attention shape, against SDPA on a dense copy of the same keys (issue 7, goal 1).

    python -m benchmarks.attention_bench [--contexts 512 2048] [--json out.json]

One decode step attends a block of `--block` queries (batch 1, 32 heads of 128) to `context` cached
keys in each of 32 layers. Each layer gets its own K/V pool, as in the engine, so the L2 cache
(50 MB on an H100) cannot hold the keys between layers; the keys sit in pages of `--page-size`
positions scattered over the pool by a shuffled page table, as a long-running engine leaves them. The 32 layers' attention (the kernel, and
for launches that merge key chunks in a second kernel, that merge, compiled) is captured in one CUDA graph and
replayed: launch gaps are what a graph leaves, as in the engine. Reported per layer, next to the
time the K/V bytes take at the copy bandwidth measured in the same run, and to the default launch
the kernel picks by itself (`dllm.kernels.pool_attention`'s defaults come from this sweep).
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from benchmarks.decode_step_bench import hbm_bandwidth_gbs, time_cuda
from benchmarks.report import write_json
from dllm.engine.cuda_graphs import capture
from dllm.kernels import pool_attention as pa


def sweep(ctx: int, args, bw: float, merge) -> list[dict]:
    dev, dtype = torch.device("cuda"), torch.bfloat16
    layers, heads, hd, block = args.layers, args.heads, args.head_dim, args.block
    kv_len = ctx + block
    capacity = kv_len + 2 * block  # the engine's slot holds a block or two beyond the context
    pages = -(-capacity // args.page_size)
    k = [torch.randn(pages, args.page_size, heads, hd, device=dev, dtype=dtype) for _ in range(layers)]
    v = [torch.randn(pages, args.page_size, heads, hd, device=dev, dtype=dtype) for _ in range(layers)]
    q = [torch.randn(1, block, heads, hd, device=dev, dtype=dtype) for _ in range(layers)]
    table = torch.randperm(pages, device=dev).int()[None]
    slots = torch.zeros(1, dtype=torch.long, device=dev)
    kv_lens = torch.full((1,), kv_len, dtype=torch.int32, device=dev)
    kv_ms = 2 * kv_len * heads * hd * 2 / (bw * 1e9) * 1e3
    rows = []

    # The reference: SDPA (flash) on dense K/V of exactly kv_len keys (no pool, no slot indirection).
    dense_k = [x[table[0].long()].flatten(0, 1)[None, :kv_len].transpose(1, 2).contiguous() for x in k]
    dense_v = [x[table[0].long()].flatten(0, 1)[None, :kv_len].transpose(1, 2).contiguous() for x in v]
    dense_q = [x.transpose(1, 2).contiguous() for x in q]

    def sdpa():
        for i in range(layers):
            F.scaled_dot_product_attention(dense_q[i], dense_k[i], dense_v[i])

    g, _ = capture(sdpa)
    ms = time_cuda(g.replay, args.iters) / layers
    rows.append({"context": ctx, "launch": "SDPA on dense K/V (reference)", "us_per_layer": 1e3 * ms,
                 "kv_us": 1e3 * kv_ms})
    ref = F.scaled_dot_product_attention(dense_q[0], dense_k[0], dense_v[0]).transpose(1, 2)

    default_m, default_n = pa.default_block_m(block), pa.default_block_n(hd)
    default_s = pa.choose_splits(1, heads, block, capacity, default_m, default_n)
    configs = [(None, None, None, True)] + [
        c for c in itertools.product(args.block_m, args.block_n, args.splits, args.merge_in_kernel) if c[2] > 1 or not c[3]]
    for block_m, block_n, splits, in_kernel in configs:
        launch = dict(splits=splits, merge=merge, block_m=block_m, block_n=block_n, merge_in_kernel=in_kernel)

        def run(launch=launch):
            for i in range(layers):
                pa.pool_attention(q[i], k[i], v[i], table, slots, kv_lens, **launch)
        g, _ = capture(run)
        ms = time_cuda(g.replay, args.iters) / layers
        out = pa.pool_attention(q[0], k[0], v[0], table, slots, kv_lens, **launch)  # after replays: counters stay right
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        name = (f"default (block_m {default_m}, block_n {default_n}, splits {default_s}, merge in kernel)"
                if block_m is None
                else f"block_m {block_m}, block_n {block_n}, splits {splits}" + (", merge in kernel" if in_kernel else ""))
        rows.append({"context": ctx, "launch": name, "block_m": block_m or default_m, "block_n": block_n or default_n,
                     "splits": splits or default_s, "merge_in_kernel": in_kernel, "us_per_layer": 1e3 * ms,
                     "kv_us": 1e3 * kv_ms, "rel_err": err})
        print(f"  ctx {ctx} {name}: {1e3 * ms:.1f} us/layer (rel err {err:.1e})", flush=True)
        del g
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16, help="cache positions per page of the K/V pool")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-m", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--block-n", type=int, nargs="+", default=[64, 128])
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--merge-in-kernel", type=lambda s: s == "yes", nargs="+", default=[False, True],
                   metavar="{yes,no}", help="merge key chunks in a second kernel (no) or in the last chunk (yes)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_bench times a Triton kernel under CUDA graphs: it needs a CUDA GPU")

    bw = hbm_bandwidth_gbs(torch.device("cuda"))
    merge = torch.compile(pa.merge_splits, dynamic=True, fullgraph=True)  # the second-kernel merge, fused
    rows = []
    for ctx in args.contexts:
        rows += sweep(ctx, args, bw, merge)
    print(f"\n{'context':>7}  {'launch':70} {'us/layer':>9} {'K/V at copy bw':>14} {'of that':>8}")
    for r in sorted(rows, key=lambda r: (r["context"], r["us_per_layer"])):
        print(f"{r['context']:7d}  {r['launch']:70} {r['us_per_layer']:9.1f} {r['kv_us']:14.1f} "
              f"{r['kv_us'] / r['us_per_layer']:8.0%}")
    write_json(args.json, {"device": torch.cuda.get_device_name(), "bandwidth_gbs": bw, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
