"""Training throughput of the Ray Train + DeepSpeed job: tokens/s per worker at 1 and 2 workers.

    python -m benchmarks.train_bench [--steps 40] [--d-model 128] [--layers 4] [--seq-len 256]

Both runs use the same model, data and per-worker batch in one invocation; the steady-state rate is
the mean of the logged intervals after the first (start-up excluded). On a 2-core machine two
workers share the cores, so the per-worker rate halves and the total shows what data parallelism
buys there; on a GPU cluster each worker has its own device.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.report import write_json
import dllm
from dllm.synthetic import all_text, make_samples
from pipelines.runtime import ensure_ray
from train.config import TrainConfig
from train.sft import final_model_dir, run_training


def make_data(root: Path, seq_len: int) -> None:
    samples = make_samples(20000, seed=0)
    tok = dllm.train_tokenizer(all_text(samples[:2000]) + ["0123456789 ="])
    tok.save_pretrained(str(root / "tok"))
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    random.Random(0).shuffle(samples)
    rows = dllm.pack_samples([(enc(s["instruction"]), enc(s["output"]) + [tok.eos_token_id]) for s in samples],
                             seq_len, mode="concat", pad_token_id=tok.eos_token_id)
    (root / "data").mkdir()
    pq.write_table(pa.table({"input_ids": [r.tolist() for r in rows.input_ids],
                             "prompt_mask": [r.tolist() for r in rows.prompt_mask],
                             "segment_ids": [r.tolist() for r in rows.segment_ids]}), str(root / "data" / "p.parquet"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="train-bench-"))
    make_data(root, args.seq_len)
    ensure_ray()
    model = {"d_model": args.d_model, "n_layers": args.layers, "n_heads": 4, "n_kv_heads": 4,
             "mlp_hidden_size": 3 * args.d_model, "max_sequence_length": 1024, "rope_theta": 10000.0}
    results = []
    for n in args.workers:
        cfg = TrainConfig(run_name=f"bench-{n}", data=str(root / "data"), tokenizer=str(root / "tok"),
                          storage_path=str(root / "runs"), model_config=model, seq_len=args.seq_len,
                          micro_batch_size=args.micro_batch, num_workers=n, precision="fp32", lr=1e-3,
                          warmup_steps=5, max_steps=args.steps, checkpoint_every=10**9, log_every=10)
        result = run_training(cfg)
        history = json.loads((final_model_dir(result) / "trainer_state.json").read_text())["history"]
        rates = [h["tokens_per_s"] for h in history[1:]] or [history[0]["tokens_per_s"]]
        total = sum(rates) / len(rates)
        results.append({"workers": n, "tokens_per_s": total, "tokens_per_s_per_worker": total / n,
                        "params": dllm.LLaDAConfig.from_file(final_model_dir(result) / "config.json").num_parameters()})
    print(f"\n{'workers':>7} {'params':>10} {'tok/s':>10} {'tok/s/worker':>13}")
    for r in results:
        print(f"{r['workers']:7d} {r['params']:10d} {r['tokens_per_s']:10.0f} {r['tokens_per_s_per_worker']:13.0f}")
    if len(results) > 1:
        print(f"total throughput ratio {results[-1]['workers']} vs {results[0]['workers']} workers: "
              f"{results[-1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
