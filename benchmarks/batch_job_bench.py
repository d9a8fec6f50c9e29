"""The batch-generation job (`dllm batch`) with one batch in flight per replica against several.

    python -m benchmarks.batch_job_bench [--model CKPT --input heldout.jsonl] [--in-flight 1 2 4] [--repeats 3]

With one batch in flight a replica waits for a batch's longest answer before it takes the next batch: its slots
empty one by one at the end of every batch. With more, the next batch's records wait in the engine's queue and take
each slot as it frees. Two measurements per setting, the settings taking turns for --repeats runs (medians):

- replica: one engine replica of the job (`pipelines.generate.Generate`, in this process) handed every batch at
  once, as Ray Data hands an async replica its batches: engine steps, rows per step (the slots in use), decode
  seconds and output tokens/s. Steps are the machine-independent measure: where a step costs about the same at any
  number of rows (a GPU below its compute bound), tokens/s follows them; on a CPU a step's cost grows with its rows.
- job: the whole job (Ray Data reading, engine actors, writing) on one embedded Ray (`--skip-job` leaves it out):
  seconds and output tokens/s, start-up included.

Each is printed with its ratio to one batch in flight. The answers are checked to be the same in every setting and
both ways (greedy answers do not depend on their batch-mates).

Without --model a random model is saved to a temporary directory and --records synthetic prompts are answered, each
with its own `max_tokens` drawn from [--block-size, --max-tokens] (a random model seldom stops by itself, so the
spread of answer lengths, which is what one batch in flight waits on, is the drawn one). With --model, --input is
the held-out file (the records' own lengths are the model's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.report import write_json
from benchmarks.serve_bench import random_checkpoint
from dllm.synthetic import make_samples
from pipelines.generate import Generate, build_parser, generation_config, run_generate
from pipelines.pack import parse_file
from pipelines.runtime import ensure_ray


def synthetic_records(path: Path, args) -> None:
    """--records synthetic prompts, each with a drawn max_tokens, as a jsonl the job reads."""
    rng = random.Random(args.seed)
    with open(path, "w") as f:
        for sample in make_samples(args.records, seed=args.seed):
            f.write(json.dumps({"prompt": sample["instruction"] + sample.get("input", ""),
                                "max_tokens": rng.randint(args.block_size, args.max_tokens)}) + "\n")


def answers_of(output: Path) -> dict:
    """(file name, line) -> generated text of a finished job's rows."""
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(output.glob("*.parquet")), columns=["source", "line", "generated_text"]).to_pylist()
    return {(Path(r["source"]).name, r["line"]): r["generated_text"] for r in table}


def job_args(model: str, inputs: list[str], output: Path, in_flight: int, args) -> argparse.Namespace:
    return build_parser().parse_args([
        "--model", model, "--input", *inputs, "--output", str(output), "--block-size", str(args.block_size),
        "--max-tokens", str(args.max_tokens), "--batch-size", str(args.batch_size),
        "--max-batch-size", str(args.max_batch_size), "--batches-in-flight", str(in_flight),
        "--replicas", str(args.replicas)])


def run_job(model: str, inputs: list[str], in_flight: int, work: Path, args) -> tuple[dict, dict]:
    """One whole job with `in_flight` batches per replica: (its stats, its answers)."""
    output = work / f"out-{in_flight}"
    stats = run_generate(job_args(model, inputs, output, in_flight, args))
    return stats, answers_of(output)


def record_batches(inputs: list[str], batch_size: int) -> list[dict]:
    """The inputs' records in batches of `batch_size`, as the job hands them to its replicas."""
    records = [r for path in inputs for r in parse_file({"path": path, "bytes": Path(path).read_bytes()})]
    return [{key: [r[key] for r in records[i:i + batch_size]] for key in records[0]}
            for i in range(0, len(records), batch_size)]


def run_replica(model: str, batches: list[dict], in_flight: int, args) -> tuple[dict, dict]:
    """One replica answering every batch with `in_flight` at a time: (its counts, its answers)."""
    job = job_args(model, ["-"], Path("-"), in_flight, args)
    replica = Generate(model, chat_template=False, config=generation_config(job), max_batch_size=job.max_batch_size,
                       max_model_len=None, quantization=None, batches_in_flight=in_flight)
    rows_per_step = []
    replica.loop.on_step = lambda stats: rows_per_step.append(stats["running"])

    async def every_batch():
        return await asyncio.gather(*(replica(batch) for batch in batches))

    t0 = time.perf_counter()
    tables = asyncio.run(every_batch())
    seconds = time.perf_counter() - t0
    replica.loop.shutdown()
    rows = [r for table in tables for r in table.to_pylist()]
    if any(r["error_kind"] for r in rows):
        raise SystemExit(f"records not answered: {[r['error'] for r in rows if r['error_kind']][:3]}")
    tokens = sum(r["completion_tokens"] for r in rows)
    counts = {"steps": len(rows_per_step), "rows_per_step": sum(rows_per_step) / max(1, len(rows_per_step)),
              "forwards": replica.engine.stats()["total_forwards"], "seconds": seconds, "tokens": tokens}
    return counts, {(Path(r["source"]).name, r["line"]): r["generated_text"] for r in rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: a random model)")
    p.add_argument("--input", nargs="+", help="with --model: the records to answer (jsonl / parquet)")
    p.add_argument("--records", type=int, default=256, help="without --input: synthetic records")
    p.add_argument("--in-flight", type=int, nargs="+", default=[1, 2, 4], help="batches in flight per replica")
    p.add_argument("--repeats", type=int, default=3, help="runs of each setting, in turns (the median is reported)")
    p.add_argument("--batch-size", type=int, default=16, help="records per batch")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together per replica")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=96, help="the job's answer cap (synthetic records: the "
                                                               "largest drawn max_tokens)")
    p.add_argument("--d-model", type=int, default=256, help="without --model: the random model's width")
    p.add_argument("--layers", type=int, default=4, help="without --model: the random model's depth")
    p.add_argument("--prompt-len", type=int, default=48, help="without --model: prompt room in the random model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-job", action="store_true", help="measure the replica only (no Ray)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if 1 not in args.in_flight:
        p.error("--in-flight must include 1, the baseline the others are compared with")
    if args.model and not args.input:
        p.error("--model needs --input (the records to answer)")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model or random_checkpoint(args, work / "model")
        inputs = args.input or [str(work / "records.jsonl")]
        if not args.input:
            synthetic_records(work / "records.jsonl", args)
        batches = record_batches(inputs, args.batch_size)
        replica_runs: dict[int, list[dict]] = {n: [] for n in args.in_flight}
        job_runs: dict[int, list[dict]] = {n: [] for n in args.in_flight}
        answers: dict[tuple[str, int], dict] = {}
        if not args.skip_job:
            ensure_ray()  # one embedded cluster for every job
        for _ in range(args.repeats):
            for n in args.in_flight:
                counts, answers["replica", n] = run_replica(model, batches, n, args)
                replica_runs[n].append(counts)
                if not args.skip_job:
                    stats, answers["job", n] = run_job(model, inputs, n, work, args)
                    job_runs[n].append(stats)
    for (way, n), got in answers.items():
        if got != answers["replica", 1]:
            raise SystemExit(f"the {way} with {n} batches in flight gave other answers than one replica with one: "
                             "the job is not batch-independent")

    rows = []
    for n in args.in_flight:
        runs = replica_runs[n]
        seconds = statistics.median(r["seconds"] for r in runs)
        row = {"batches_in_flight": n, "records": sum(len(b["record"]) for b in batches), "tokens": runs[0]["tokens"],
               "steps": runs[0]["steps"], "rows_per_step": runs[0]["rows_per_step"], "forwards": runs[0]["forwards"],
               "replica_seconds": seconds,
               "replica_tokens_per_s": runs[0]["tokens"] / seconds, "replica_runs_seconds": [r["seconds"] for r in runs]}
        if job_runs[n]:
            job_seconds = statistics.median(s["seconds"] for s in job_runs[n])
            row.update(job_seconds=job_seconds, job_tokens_per_s=job_runs[n][0]["completion_tokens"] / job_seconds,
                       job_runs_seconds=[s["seconds"] for s in job_runs[n]])
        rows.append(row)
    base = next(r for r in rows if r["batches_in_flight"] == 1)
    print(f"{'in flight':>9} {'records':>8} {'tokens':>7} {'steps':>6} {'rows/step':>9} {'forwards':>8} {'replica s':>9} "
          f"{'tok/s':>7} {'x one':>6} {'job s':>7} {'tok/s':>7} {'x one':>6}")
    for r in rows:
        r["steps_saved"] = 1 - r["steps"] / base["steps"]
        r["replica_speedup"] = r["replica_tokens_per_s"] / base["replica_tokens_per_s"]
        line = (f"{r['batches_in_flight']:>9} {r['records']:>8} {r['tokens']:>7} {r['steps']:>6} "
                f"{r['rows_per_step']:>9.2f} {r['forwards']:>8} {r['replica_seconds']:>9.2f} {r['replica_tokens_per_s']:>7.1f} "
                f"{r['replica_speedup']:>6.2f}")
        if "job_seconds" in r:
            r["job_speedup"] = r["job_tokens_per_s"] / base["job_tokens_per_s"]
            line += f" {r['job_seconds']:>7.2f} {r['job_tokens_per_s']:>7.1f} {r['job_speedup']:>6.2f}"
        print(line)
    result = {"settings": vars(args), "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
