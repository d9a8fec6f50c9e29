"""Packing pipeline throughput: the Ray Data job against a single-process loop doing the same
tokenise + pack work, in one run, plus packing efficiency in both modes.

    python -m benchmarks.pipeline_bench [--samples 20000] [--seq-len 2048] [--num-tokenizers 2]

The data is synthetic Alpaca-style text with a long-tailed (log-normal) length distribution like
real SFT data. The ratio includes Ray's fixed costs (cluster start excluded, job setup included),
so it favours Ray more as the data grows.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from benchmarks.report import write_json
import dllm
from dllm.packing import pack_samples
from pipelines.pack import PackOptions, Tokenize, run_pack
from pipelines.runtime import ensure_ray

WORDS = "the a model block token mask diffusion answer prompt ray data train serve cache fast length".split()


def make_data(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = lambda k: " ".join(rng.choice(WORDS) for _ in range(max(1, k)))  # noqa: E731
            f.write(json.dumps({"instruction": words(int(rng.lognormvariate(3.0, 0.6))), "input": "",
                                "output": words(int(rng.lognormvariate(3.5, 0.8)))}) + "\n")


def single_process(path: Path, tok_dir: str, seq_len: int, mode: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    tok = Tokenize(tok_dir, chat_template=False, max_sample_len=seq_len)
    samples = []
    for line in open(path):
        try:
            samples += [tok.sample(prompt, answer) for prompt, answer in tok.texts(json.loads(line))]
        except ValueError:
            pass
    packed = pack_samples(samples, seq_len, mode=mode, pad_token_id=tok.eos)
    return packed.real_tokens, time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--num-tokenizers", type=int, default=2)
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="pack-bench-"))
    make_data(work / "data.jsonl", args.samples)
    tok = dllm.train_tokenizer([" ".join(WORDS)] * 10, kind="bpe", vocab_size=400)
    tok.save_pretrained(str(work / "tok"))
    ensure_ray()
    results = []
    for mode in ("concat", "no_split"):
        base_tokens, base_s = single_process(work / "data.jsonl", str(work / "tok"), args.seq_len, mode)
        t0 = time.perf_counter()
        stats = run_pack(PackOptions(inputs=[str(work / "data.jsonl")], output=str(work / f"out-{mode}"),
                                     tokenizer=str(work / "tok"), seq_len=args.seq_len, mode=mode,
                                     num_tokenizers=args.num_tokenizers))
        ray_s = time.perf_counter() - t0
        assert stats["tokens_out"] == base_tokens, "both paths must pack the same tokens"
        results.append({"mode": mode, "tokens": base_tokens, "single_process_tok_s": base_tokens / base_s,
                        "ray_data_tok_s": base_tokens / ray_s, "ratio": base_s / ray_s,
                        "packing_efficiency": stats["packing_efficiency"], "rows": stats["rows_written"]})
    print(f"\n{'mode':9} {'tokens':>10} {'1-proc tok/s':>13} {'Ray Data tok/s':>15} {'ratio':>6} {'efficiency':>11}")
    for r in results:
        print(f"{r['mode']:9} {r['tokens']:10d} {r['single_process_tok_s']:13.0f} {r['ray_data_tok_s']:15.0f} "
              f"{r['ratio']:5.2f}x {r['packing_efficiency']:10.2%}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
