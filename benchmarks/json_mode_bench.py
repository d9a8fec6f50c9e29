"""JSON mode against free decoding on a model trained to answer in JSON (the synthetic `record` task).

    dllm quickstart --tasks record --minutes 5 --workdir qs-json       # a checkpoint that writes JSON
    python -m benchmarks.json_mode_bench --model qs-json/runs/*/checkpoint_*/hf --prompts-jsonl qs-json/data/heldout.jsonl

The same held-out prompts decoded three times per batch size on one engine: free (the threshold decoder), with
response_format="json_object" (each block from the left, each position's most likely token that keeps the answer
a JSON prefix) and with "json_schema" (the record task's schema, dllm.synthetic.RECORD_SCHEMA). Per mode: exact
match against the reference, the answers that are JSON objects (json.loads reads a dict) and those that fit the
record schema, tokens per forward, output tokens/s (the median of --repeats runs, the modes taking turns); then each
JSON mode / free for tok/s and TPF. JSON mode commits from the
left (a run of sure positions per step, not every sure position) and reads each step's candidates on the host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import dllm
from benchmarks.checkpoint_args import add_checkpoint_arguments, load_checkpoint
from dllm.synthetic import RECORD_SCHEMA


def parsed(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def fits_record(value) -> bool:
    """The record schema, checked on the decoded value (independently of the decoding's automaton)."""
    kinds = {"name": lambda v: isinstance(v, str), "age": lambda v: type(v) is int,
             "tags": lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
             "ok": lambda v: isinstance(v, bool)}
    return isinstance(value, dict) and all(k in kinds and kinds[k](v) for k, v in value.items())


def run_mode(engine, rows: list[dict], cfg: dllm.GenerationConfig, batch: int) -> dict:
    """Decode the rows' prompts `batch` at a time (continuous batching keeps `batch` in flight)."""
    prompts = [r["instruction"] + r.get("input", "") for r in rows]
    t0 = time.perf_counter()
    gens = []
    for start in range(0, len(prompts), batch):
        gens += engine.generate(prompts[start:start + batch], cfg)
    seconds = time.perf_counter() - t0
    tokens = sum(len(g.token_ids) for g in gens)
    forwards = sum(g.num_forwards for g in gens)
    return {"exact_match": sum(g.text == r["output"] for g, r in zip(gens, rows)) / len(rows),
            "json_objects": sum(isinstance(parsed(g.text), dict) for g in gens) / len(rows),
            "fit_the_schema": sum(fits_record(parsed(g.text)) for g in gens) / len(rows),
            "self_stopped": sum(g.finish_reason == "stop" for g in gens) / len(rows),
            "tokens": tokens, "forwards": forwards, "tpf": tokens / max(1, forwards), "seconds": seconds,
            "tokens_per_s": tokens / seconds,
            "examples": [{"prompt": p, "target": r["output"], "answer": g.text}
                         for p, r, g in list(zip(prompts, rows, gens))[:4]]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p, "held-out jsonl of the record task (instruction, input, output)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="requests decoded together")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs of each mode, in turns (tok/s: their median)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    model, tokenizer, rows = load_checkpoint(args)
    rows = [r for r in rows if r.get("task", "record") == "record"][:args.num_prompts]
    if not rows:
        raise SystemExit(f"{args.prompts_jsonl} holds no record-task rows: JSON mode needs answers in JSON")
    engine = dllm.Engine(model, tokenizer, max_batch_size=max(args.batch), prefix_caching=False, max_model_len=512)
    free = dllm.GenerationConfig(block_size=args.block_size, threshold=args.threshold, early_stop=True,
                                 max_new_tokens=args.max_new_tokens)
    modes = {"free": free, "json_object": free.replace(response_format="json_object"),
             "json_schema": free.replace(response_format="json_schema", json_schema=RECORD_SCHEMA)}
    engine.generate([rows[0]["instruction"]], modes["json_object"])  # warm-up (and the vocabulary's bytes)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "args": vars(args),
              "prompts": len(rows), "batches": {}}
    print(f"{'batch':>5} {'mode':>12} {'exact':>6} {'JSON':>6} {'schema':>6} {'stop':>6} {'TPF':>6} {'tok/s':>8}")
    for batch in args.batch:
        # The modes take turns, --repeats times: a slow spell of a noisy machine falls on each of them alike.
        runs = {name: [] for name in modes}
        for _ in range(args.repeats):
            for name, cfg in modes.items():
                runs[name].append(run_mode(engine, rows, cfg, batch))
        measured = {}
        for name, rs in runs.items():
            if any(r["examples"] != rs[0]["examples"] or r["tokens"] != rs[0]["tokens"] for r in rs):
                raise SystemExit(f"{name}: the repeats decoded different answers")  # greedy: they must not
            measured[name] = {**rs[0], "seconds": statistics.median(r["seconds"] for r in rs),
                              "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                              "tokens_per_s_runs": [r["tokens_per_s"] for r in rs]}
        for name, r in measured.items():
            print(f"{batch:>5} {name:>12} {r['exact_match']:6.1%} {r['json_objects']:6.1%} {r['fit_the_schema']:6.1%} "
                  f"{r['self_stopped']:6.1%} "
                  f"{r['tpf']:6.2f} {r['tokens_per_s']:8.1f}")
        free_r = measured["free"]
        for name in ("json_object", "json_schema"):
            r = measured[name]
            ratio = measured[f"{name}_over_free"] = {"tokens_per_s": r["tokens_per_s"] / free_r["tokens_per_s"],
                                                     "tpf": r["tpf"] / free_r["tpf"]}
            print(f"{batch:>5} {name + ' / free':>20} tok/s {ratio['tokens_per_s']:.2f}x, TPF {ratio['tpf']:.2f}x")
        result["batches"][str(batch)] = measured
        if args.json:  # rewritten after every batch size: a cut-off run keeps what it measured
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
