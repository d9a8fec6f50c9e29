"""`dllm quickstart`: every part of the system, end to end, on an embedded local Ray.

1. synthetic variable-length task -> jsonl (train + held-out)
2. char tokenizer + small LLaDA-shaped config; Ray Data packing (each answer's EOS followed by 0-8
   more); Ray Train + DeepSpeed training with the dLLM-Var objective (tail masking on, packed
   samples under a document mask; see DESIGN.md "Training objective" and the README's objective study)
3. Ray Serve deployment; the held-out prompts go through the OpenAI-compatible HTTP API
4. a report: exact match, answer lengths, self-stopping rate, tokens/s, TPF, and LLaDA vanilla
   decoding of the same prompts on the same model, so the speedup is measured in the same run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

# String tasks a small model learns in minutes on 2 cores, with answers of 1 to ~34 characters
# (add and count need more training than the quickstart's budget; `--tasks` picks any set).
QUICK_TASKS = ["dedupe", "repeat", "reverse", "sort", "spell"]
# Letter strings of at most 5: the same answer formats (repeat still spans 1 to 34 characters), but
# an exact match needs fewer positions right (12 min on 2 cores, 2026-11-23: 42-59.5 % exact match at 5
# letters, 35 % at 6 with 11 min, 7 % with the tasks' own 12-14 letters and 8 min).
QUICK_MAX_WORD_LEN = 5
QUICK_SEQ_LEN = 64  # a few samples per row: a model trained from scratch finds its sample faster
QUICK_EVAL_EVERY = 500  # steps between validation losses on the packed held-out prompts (and at the end)
QUICK_MODEL = {"d_model": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 384,
               "max_sequence_length": 512, "rope_theta": 10000.0}
# The quickstart's TrainConfig settings besides its data and budget (the flags' defaults for the objective): what
# the benchmarks that train "as the quickstart does" start from.
QUICK_TRAINING = {"model_config": QUICK_MODEL, "lr": 3e-3, "warmup_steps": 50, "weight_decay": 0.01, "epochs": None,
                  "checkpoint_every": 10**9, "log_every": 50, "tail_mask_prob": 0.5, "tail_eos": True,
                  "document_mask": True, "cut_answer_prob": 0.5}


def add_quickstart_parser(sub) -> None:
    p = sub.add_parser("quickstart", help="synthetic data -> pack -> train -> serve -> report, on a local Ray")
    p.add_argument("--workdir", default="quickstart", help="where data, checkpoints and the report go")
    p.add_argument("--minutes", type=float, default=12.0, help="training time budget (trade time for accuracy)")
    p.add_argument("--steps", type=int, default=100000, help="cap on optimizer steps (the time budget usually ends first)")
    p.add_argument("--train-samples", type=int, default=40000)
    p.add_argument("--heldout", type=int, default=200, help="held-out prompts sent through the HTTP API")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (GPUs when present, else CPU processes)")
    p.add_argument("--tail-mask", type=float, default=QUICK_TRAINING["tail_mask_prob"],
                   help="fraction of rows with tail masking (0 with --no-document-mask = the paper's objective exactly)")
    p.add_argument("--tail-eos", action=argparse.BooleanOptionalAction, default=QUICK_TRAINING["tail_eos"],
                   help="train the tail-masked positions to predict EOS: a denser length signal (default on; see README)")
    p.add_argument("--document-mask", action=argparse.BooleanOptionalAction, default=QUICK_TRAINING["document_mask"],
                   help="packed samples attend only within themselves (a tail joins the sample it follows); "
                        "--no-document-mask: the paper's full attention over the row (see README)")
    p.add_argument("--eos-pad", type=int, default=8,
                   help="follow each training answer's EOS with 0-N more, always masked (0 = none; see README)")
    p.add_argument("--pad-eos-weight", type=float, default=1.0,
                   help="loss weight of those padding EOS relative to the other positions, 0-1 (see README)")
    p.add_argument("--cut-answer", type=float, default=QUICK_TRAINING["cut_answer_prob"],
                   help="fraction of rows whose answers are seen only up to a random cut, as a block of a longer "
                        "answer is at inference, 0-1 (default %(default)s; 0: off; see README)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--tasks", nargs="+", default=QUICK_TASKS, help="synthetic tasks to train and evaluate on")
    p.add_argument("--max-word-len", type=int, default=QUICK_MAX_WORD_LEN,
                   help="cap on the tasks' letter strings (0 = each task's own range, up to 12-14 letters)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--keep-serving", action="store_true", help="leave the server up after the report")
    p.set_defaults(func=lambda args, rest: run_quickstart(args))


class Stage:
    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.n = 0

    def __call__(self, title: str) -> None:
        self.n += 1
        print(f"\n=== [{self.n}/6] {title}  (elapsed {time.time() - self.t0:.0f}s) ===", flush=True)


def _configs(args, work: Path, gpu: bool):
    """The packing and training configs of this run; they check every setting themselves."""
    from pipelines.pack import PackOptions
    from train.config import TrainConfig

    pack = PackOptions(inputs=[str(work / "data" / "train.jsonl")], output=str(work / "packed"),
                       tokenizer=str(work / "tokenizer"), seq_len=QUICK_SEQ_LEN, mode="concat", eos_pad=args.eos_pad)
    tail_eos = args.tail_eos and args.tail_mask > 0  # EOS targets live on the tail-masked positions
    objective = {"tail_mask_prob": args.tail_mask, "tail_eos": tail_eos, "document_mask": args.document_mask,
                 "pad_eos_weight": args.pad_eos_weight, "cut_answer_prob": args.cut_answer}
    train = TrainConfig(**{**QUICK_TRAINING, **objective}, run_name=f"quickstart-{int(time.time())}", data=pack.output,
                        tokenizer=pack.tokenizer, storage_path=str(work / "runs"), seq_len=QUICK_SEQ_LEN,
                        micro_batch_size=max(1, 64 // max(1, args.workers)), num_workers=args.workers, use_gpu=gpu,
                        precision="bf16" if gpu else "fp32", max_steps=args.steps, time_limit_s=args.minutes * 60,
                        eval_data=str(work / "packed-heldout"), eval_every=QUICK_EVAL_EVERY)
    return pack, train


def run_quickstart(args) -> int:
    import torch

    import dllm
    from dllm.synthetic import all_text, make_samples, write_dataset
    from pipelines.pack import PipelineError
    from train.config import ConfigError

    t0 = time.time()
    work = Path(args.workdir).absolute()
    gpu = torch.cuda.is_available()
    try:  # bad settings are refused before any work
        pack_options, cfg = _configs(args, work, gpu)
    except (ConfigError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stage = Stage(t0)
    work.mkdir(parents=True, exist_ok=True)

    stage("synthetic variable-length task")
    train_path, held_path = write_dataset(work / "data", args.train_samples, args.heldout, seed=0, tasks=args.tasks,
                                          max_word_len=args.max_word_len or None)
    print(f"train: {train_path} ({args.train_samples} samples)  held-out: {held_path} ({args.heldout})")

    stage("tokenizer + model config")
    # Every default task's characters (the same vocabulary whichever of them run), and the chosen tasks' (record's JSON)
    tok = dllm.train_tokenizer(all_text(make_samples(5000, seed=99)) + ["0123456789 ="]
                               + all_text(make_samples(500, seed=98, tasks=args.tasks)), kind="char")
    tok.save_pretrained(pack_options.tokenizer)
    print(f"char tokenizer: {len(tok)} tokens; model: {QUICK_MODEL}")

    stage("Ray Data: tokenise + pack")
    from pipelines.pack import run_pack, summary
    from pipelines.runtime import dashboard_url, ensure_ray

    ensure_ray(dashboard=True, quiet=False)  # worker output (training progress) reaches this terminal
    print(f"Ray dashboard: {dashboard_url() or 'not available'}")
    stats = run_pack(dataclasses.replace(pack_options, inputs=[str(train_path)]))
    print(summary(stats))
    # the held-out prompts packed alike: the training job's eval_data (a validation loss as it trains)
    held_stats = run_pack(dataclasses.replace(pack_options, inputs=[str(held_path)], output=cfg.eval_data))
    print(summary(held_stats))

    stage(f"Ray Train + DeepSpeed ZeRO-2: dLLM-Var SFT for up to {args.minutes:g} min")
    from train.sft import final_model_dir, run_training

    result = run_training(cfg)
    if result.error:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    model_dir = final_model_dir(result)
    history = json.loads((model_dir / "trainer_state.json").read_text())["history"]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    print(f"trained {history[-1]['step']} steps, loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}, "
          f"held-out loss {evals[0]:.3f} -> {evals[-1]:.3f}; checkpoint {model_dir}")

    stage("Ray Serve: held-out prompts through the OpenAI-compatible API")
    report = evaluate_over_http(model_dir, held_path, args)

    stage("LLaDA vanilla baseline on the same model and prompts")
    report["vanilla"] = evaluate_vanilla(model_dir, held_path, report)
    van = report["vanilla"]["tokens_per_s"]  # 0 when the baseline's answers are all empty: no ratio then
    report["speedup_tps_vs_vanilla"] = report["served"]["tokens_per_s"] / van if van > 0 else None
    report["elapsed_s"] = time.time() - t0
    report["train"] = {"steps": history[-1]["step"], "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
                       "first_eval_loss": evals[0], "last_eval_loss": evals[-1],
                       "tail_mask_prob": args.tail_mask, "tail_eos": cfg.tail_eos, "document_mask": args.document_mask,
                       "eos_pad": args.eos_pad, "pad_eos_weight": args.pad_eos_weight,
                       "cut_answer_prob": args.cut_answer, "minutes": args.minutes}
    (work / "report.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    if args.keep_serving:
        print(f"still serving at http://127.0.0.1:{args.port}/v1 (model '{report['model']}'); Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    from ray import serve

    serve.shutdown()
    return 0


def _heldout(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def evaluate_over_http(model_dir: Path, held_path: Path, args) -> dict:
    import concurrent.futures as cf

    import httpx
    from ray import serve

    from serve.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    name = "quickstart"
    serve.run(build_app({"model": str(model_dir), "name": name, "max_model_len": 512, "max_batch_size": 16,
                         "num_cpus": 1, "decoding": {"block_size": args.block_size, "max_tokens": 64}}),
              name="dllm", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}/v1/completions"
    rows = _heldout(held_path)

    def ask(row):
        r = httpx.post(url, json={"model": name, "prompt": row["instruction"] + row["input"], "max_tokens": 64},
                       timeout=300)
        r.raise_for_status()
        return r.json()

    t = time.time()
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, rows))
    wall = time.time() - t
    texts = [a["choices"][0]["text"] for a in answers]
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    forwards = sum(a["dllm"]["forwards"] for a in answers)
    per_task: dict[str, list[bool]] = {}
    for row, text in zip(rows, texts):
        per_task.setdefault(row["task"], []).append(text == row["output"])
    return {
        "model": name, "checkpoint": str(model_dir), "prompts": len(rows), "block_size": args.block_size,
        "served": {
            "exact_match": sum(t == r["output"] for t, r in zip(texts, rows)) / len(rows),
            "self_stopped": sum(a["choices"][0]["finish_reason"] == "stop" for a in answers) / len(rows),
            "tokens_per_s": tokens / wall, "tpf": tokens / max(1, forwards), "wall_s": wall, "concurrency": 8,
            "target_len": _lengths([len(r["output"]) for r in rows]),
            "produced_len": _lengths([a["usage"]["completion_tokens"] for a in answers]),
            "per_task_exact_match": {k: sum(v) / len(v) for k, v in sorted(per_task.items())},
        },
        "examples": [{"prompt": r["instruction"], "target": r["output"], "answer": t} for r, t in zip(rows[:6], texts)],
    }


def evaluate_vanilla(model_dir: Path, held_path: Path, report: dict) -> dict:
    """LLaDA vanilla (canvas 64, 64 steps, no cache) vs our engine in-process, one prompt at a time."""
    import torch

    import dllm
    from dllm.baselines import llada_generate

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, tok = dllm.load_model(model_dir), dllm.load_tokenizer(model_dir)
    rows = _heldout(held_path)[:20]
    prompts = [tok(r["instruction"] + r["input"], add_special_tokens=False)["input_ids"] for r in rows]
    engine = dllm.Engine(model, tok, max_batch_size=1, max_model_len=512)
    cfg = dllm.GenerationConfig(block_size=report["block_size"], max_new_tokens=64, early_stop=True)
    t = time.time()
    ours = [engine.generate([p], cfg)[0] for p in prompts]
    ours_s = time.time() - t
    t = time.time()
    vanilla = [llada_generate(model, [p], gen_length=64, steps=64, block_length=64) for p in prompts]
    van_s = time.time() - t
    van_texts = [tok.decode(v.token_ids[0], skip_special_tokens=True) for v in vanilla]
    van_tokens = sum(len(v.token_ids[0]) for v in vanilla)
    our_tokens = sum(len(g.token_ids) for g in ours)
    return {
        "prompts": len(rows), "gen_length": 64, "steps": 64,
        "exact_match": sum(t == r["output"] for t, r in zip(van_texts, rows)) / len(rows),
        "tokens_per_s": van_tokens / van_s, "tpf": van_tokens / sum(v.num_forwards for v in vanilla),
        "engine_batch1_tokens_per_s": our_tokens / ours_s,
        "engine_batch1_exact_match": sum(g.text == r["output"] for g, r in zip(ours, rows)) / len(rows),
        "engine_batch1_tpf": our_tokens / max(1, sum(g.num_forwards for g in ours)),
        "speedup_batch1": (our_tokens / ours_s) / (van_tokens / van_s) if van_tokens else None,
    }


def _lengths(values: list[int]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def print_report(r: dict) -> None:
    s, v = r["served"], r["vanilla"]
    print("\n================ quickstart report ================")
    print(f"held-out prompts: {r['prompts']} (through HTTP, concurrency {s['concurrency']})")
    print(f"exact match: {s['exact_match']:.1%}   self-stopped (EOS): {s['self_stopped']:.1%}")
    print(f"answer length target {s['target_len']}  produced {s['produced_len']}")
    print(f"served: {s['tokens_per_s']:.1f} tok/s, TPF {s['tpf']:.2f}")
    print("per task exact match: " + ", ".join(f"{k} {x:.0%}" for k, x in s["per_task_exact_match"].items()))
    print(f"batch 1, first {v['prompts']} prompts: dLLM-Var engine {v['engine_batch1_tokens_per_s']:.1f} tok/s "
          f"(TPF {v['engine_batch1_tpf']:.2f}, EM {v['engine_batch1_exact_match']:.0%}) vs LLaDA vanilla "
          f"(gen {v['gen_length']}, {v['steps']} steps) {v['tokens_per_s']:.1f} tok/s (TPF {v['tpf']:.2f}, "
          f"EM {v['exact_match']:.0%}): " + (f"{v['speedup_batch1']:.1f}x" if v["speedup_batch1"] is not None else
                                              "no ratio (the baseline produced no tokens)"))
    for e in r["examples"]:
        print(f"  {e['prompt']!r:32} target {e['target']!r:24} got {e['answer']!r}")
    print(f"total time {r['elapsed_s'] / 60:.1f} min; report saved as report.json")
