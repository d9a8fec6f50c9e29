"""Ray Data job: decode instruction data with engine replicas, keep verified trajectories -> parquet.

    python -m pipelines.trajectories --model CKPT --input 'data/train.jsonl' --output traj/ [--verifier exact_match]

The first half of trajectory compression (see `dllm.trajectory`): an actor pool of engines (one model
replica each; a GPU each with --gpus-per-replica 1) decodes the samples with trajectory recording on;
the verifier keeps the right answers. Output rows: `prompt_ids`, `tokens` (all decoded blocks, one
after the other), `reveal_step` (per token: the step of its block that committed it; -1 = never),
`block_size`; plus `stats.json` (samples, kept). `train` reads this directory with
`objective: trajectory`.

Verifiers: `exact_match` (the answer equals the sample's `output`), `any` (keep everything), or
`package.module:function` taking (sample dict, generated text) -> bool.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import pyarrow as pa

import dllm
from dllm.trajectory import ROW_COLUMNS, exact_match, record_gold

from .runtime import ensure_ray


def load_verifier(name: str):
    if name == "exact_match":
        return exact_match
    if name == "any":
        return lambda sample, text: True
    if ":" not in name:
        raise ValueError(f"verifier {name!r}: use exact_match, any, or package.module:function")
    module, func = name.split(":", 1)
    return getattr(importlib.import_module(module), func)


class TrajectoryRecorder:
    """One engine replica; decodes a batch of samples and returns its gold trajectories as rows."""

    def __init__(self, model: str, verifier: str, config: dict, max_batch_size: int) -> None:
        device, dtype = dllm.inference_placement()
        net = dllm.load_model(model, device=device, dtype=dtype)
        self.engine = dllm.Engine(net, dllm.load_tokenizer(model), max_batch_size=max_batch_size)
        self.config = dllm.GenerationConfig(**config)
        self.verifier = load_verifier(verifier)

    def __call__(self, batch: dict) -> pa.Table:
        samples = [{k: batch[k][i] for k in batch} for i in range(len(batch["instruction"]))]
        gold, stats = record_gold(self.engine, samples, self.config, self.verifier)
        # Plain Arrow list<int64> columns (not Ray's tensor extension): any parquet reader opens them.
        rows = [t.to_row() for t in gold]
        return pa.table({c: pa.array([r[c] for r in rows], type=pa.int64() if c == "block_size" else pa.list_(pa.int64()))
                         for c in ROW_COLUMNS})


def run_trajectories(args) -> dict:
    ray = ensure_ray(args.address)
    t0 = time.time()
    load_verifier(args.verifier)  # fail before any work on a bad name
    data = ray.data.read_json(args.input).repartition(4 * args.replicas)  # a small file is one block: one replica
    n_in = data.count()
    config = {"block_size": args.block_size, "threshold": args.threshold, "max_new_tokens": args.max_new_tokens,
              "decoder": args.decoder, "early_stop": True}
    out = data.map_batches(
        TrajectoryRecorder, fn_constructor_kwargs={"model": args.model, "verifier": args.verifier, "config": config,
                                                   "max_batch_size": args.max_batch_size},
        batch_size=args.batch_size, concurrency=args.replicas, num_gpus=args.gpus_per_replica or None,
        batch_format="numpy")
    out = out.materialize()
    kept = out.count()
    out.write_parquet(args.output, mode="overwrite")
    stats = {"samples": n_in, "kept": kept, "kept_fraction": kept / max(1, n_in), "verifier": args.verifier,
             "seconds": round(time.time() - t0, 1), "output": args.output, "generation": config}
    with open(os.path.join(args.output, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    return stats


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m pipelines.trajectories", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (model + tokenizer)")
    p.add_argument("--input", "-i", nargs="+", required=True, help="Alpaca-style jsonl (instruction, input, output)")
    p.add_argument("--output", "-o", required=True, help="output directory (parquet + stats.json; overwritten)")
    p.add_argument("--verifier", default="exact_match", help="exact_match, any, or package.module:function")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--decoder", default="threshold", choices=list(dllm.engine.DECODERS))
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--replicas", type=int, default=1, help="engine actors")
    p.add_argument("--gpus-per-replica", type=float, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="samples per engine call")
    p.add_argument("--max-batch-size", type=int, default=16, help="engine concurrency per replica")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        stats = run_trajectories(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"kept {stats['kept']} of {stats['samples']} trajectories ({stats['kept_fraction']:.0%}) -> {stats['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
