"""Which training objective teaches the dLLM-Var model the tasks fastest? (issue 7, goal 3)

    python -m benchmarks.objective_bench [--steps 600] [--size small] [--variants tail tail-eos ...] [--json out.json]
    python -m benchmarks.objective_bench --steps 4000 --evaluate-every 500 --variants tail-eos   # learning curves
    python -m benchmarks.objective_bench --variants A B --seeds 0 1 2 3 4   # mean and range over five draws each
    python -m benchmarks.objective_bench --from-json a.json b.json --baseline A   # seed by seed against A, no training

The trained dLLM-Var model trails its autoregressive twin in exact match at the same training
budget (README, H100 section). This trains one model per objective variant, and the AR twin, for
the same steps on the same rows (trained_compare's loop and data), and scores each on the same
held-out prompts: exact match overall and per task, self-stop rate, TPF. Accuracy, not time, is
the measurement, so a noisy CPU serves; every variant starts from the same initial weights.
With --evaluate-every N each model is also scored every N steps (one run, so the rate is not yet
decayed at the intermediate points): does the gap to the AR twin close with training?

Over seeds, each variant is also compared with the baseline variant (--baseline, default the first) seed by
seed: a seed draws the same weights, batches and noise for every variant, so the paired differences say more
than two means whose spreads overlap (benchmarks.stats.paired_comparison: mean, 95 % interval, t-test and
sign-flip p). --from-json reads earlier runs of the same command (e.g. one invocation per variant) and reports
them together.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import dllm
from benchmarks.ar_twin import to_hf_llama
from benchmarks.report import write_json
from benchmarks.stats import paired_comparison
from benchmarks.trained_compare import (Objective, add_run_arguments, build_data, eval_autoregressive, eval_engine,
                                        model_config, train)

VARIANTS = {
    "paper": Objective(tail_mask_prob=0.0, tail_eos=False),  # dLLM-Var as published
    "tail": Objective(tail_eos=False),  # + tail masking without loss on the tails
    "tail-eos": Objective(tail_eos=True),  # + EOS targets on the tails (the quickstart's and trained_compare's)
    "tail-eos-t01": Objective(tail_eos=True, t_min=0.0, t_max=1.0),
    "tail-eos-inverse-t": Objective(tail_eos=True, loss_weighting="inverse_t"),
    "tail-eos-complementary": Objective(tail_eos=True, complementary=True),
    "tail-eos-t01-complementary": Objective(tail_eos=True, t_min=0.0, t_max=1.0, complementary=True),
    "tail-eos-clean-prefix": Objective(tail_eos=True, clean_prefix_prob=0.5),  # half the rows: answers' prefixes clean
    "tail-eos-document-mask": Objective(tail_eos=True, document_mask=True),  # packed samples do not see each other
    "tail-eos-document-mask-per-sample": Objective(tail_eos=True, document_mask=True, loss_weighting="per_sample"),
    # half the rows' answers cut (below), without EOS padding
    "tail-eos-document-mask-cut": Objective(tail_eos=True, document_mask=True, cut_answer_prob=0.5),
    # every answer followed by 0-8 extra always-masked EOS: masks past each answer, its length hidden
    "tail-eos-document-mask-eos-pad": Objective(tail_eos=True, document_mask=True, eos_pad=8),
    "tail-eos-document-mask-eos-pad2": Objective(tail_eos=True, document_mask=True, eos_pad=2),  # fewer padding losses
    # 0-8 padding EOS, each weighing a quarter of another position in the loss
    "tail-eos-document-mask-eos-pad-w025": Objective(tail_eos=True, document_mask=True, eos_pad=8, pad_eos_weight=0.25),
    # + half the rows' answers seen only up to a random cut (a block of an answer that goes on past it)
    "tail-eos-document-mask-eos-pad-cut": Objective(tail_eos=True, document_mask=True, eos_pad=8, cut_answer_prob=0.5),
    "tail-eos-document-mask-eos-pad-cut02": Objective(tail_eos=True, document_mask=True, eos_pad=8, cut_answer_prob=0.2),
    "document-mask": Objective(tail_mask_prob=0.0, tail_eos=False, document_mask=True),  # the mask, no tails: 0 %
}


def per_task(texts: list[str], held: list[dict]) -> dict[str, float]:
    tasks = sorted({s["task"] for s in held})
    out = {}
    for task in tasks:
        pairs = [(t, s) for t, s in zip(texts, held) if s["task"] == task]
        out[task] = sum(t == s["output"] for t, s in pairs) / len(pairs)
    return out


def over_seeds(runs: list[dict]) -> list[dict]:
    """Each (variant, system)'s runs over the seeds: mean, min and max exact match, mean TPF."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["variant"], r["system"]), []).append(r)
    out = []
    for (variant, system), rs in groups.items():
        ems = [r["exact_match"] for r in rs]
        out.append({"variant": variant, "system": system, "seeds": [r["seed"] for r in rs],
                    "exact_match": sum(ems) / len(ems), "exact_match_min": min(ems), "exact_match_max": max(ems),
                    "tpf": sum(r["tpf"] for r in rs) / len(rs),
                    "per_task": {t: sum(r["per_task"][t] for r in rs) / len(rs) for t in rs[0]["per_task"]}})
    return out


def paired_against(runs: list[dict], baseline: str) -> list[dict]:
    """Each (variant, system)'s exact match against the baseline variant's, seed by seed (paired_comparison),
    decoder against the same decoder where the baseline was scored with it, else against the baseline's first."""
    scores: dict[tuple[str, str], dict[int, float]] = {}
    for r in runs:
        scores.setdefault((r["variant"], r["system"]), {})[r["seed"]] = r["exact_match"]
    base_systems = [system for variant, system in scores if variant == baseline]
    if not base_systems:
        raise ValueError(f"baseline {baseline!r} has no runs; the runs' variants: "
                         f"{sorted({v for v, _ in scores})}")
    out = []
    for (variant, system), by_seed in scores.items():
        against = system if system in base_systems else base_systems[0]
        if variant == baseline or len(set(by_seed) & set(scores[(baseline, against)])) < 2:
            continue
        out.append({"variant": variant, "system": system, "baseline": baseline, "baseline_system": against,
                    **paired_comparison(scores[(baseline, against)], by_seed)})
    return out


def load_runs(paths: list[str]) -> list[dict]:
    """The runs of earlier --json files, one (variant, system, seed) each: a repeat is refused, not averaged in."""
    runs, seen = [], {}
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["runs"]:
                key = (r["variant"], r["system"], r["seed"])
                if key in seen:
                    raise ValueError(f"{path}: {key} is already in {seen[key]}; give each run once")
                seen[key] = path
                runs.append(r)
    return runs


def print_curves(runs: list[dict]) -> None:
    """Exact match per evaluation step: one column per model (and decoder)."""
    columns = {}
    for r in runs:
        for point in r["training"].get("curve", []):
            if r["variant"] == "autoregressive twin":
                columns.setdefault("AR twin", {})[point["step"]] = point["exact_match"]
            else:
                for decoder, scores in point.items():
                    if decoder != "step":
                        columns.setdefault(f"{r['variant']} ({decoder})", {})[point["step"]] = scores["exact_match"]
    steps = sorted({s for col in columns.values() for s in col})
    print(f"\nexact match during training\n{'step':>6} " + " ".join(f"{c:>26}" for c in columns))
    for step in steps:
        print(f"{step:6d} " + " ".join(f"{col[step]:26.1%}" if step in col else f"{'-':>26}" for col in columns.values()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.set_defaults(size="small", seq_len=128, lr=3e-3, warmup=50, train_samples=50000)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--decoders", nargs="+", choices=dllm.engine.DECODERS, default=["threshold"],
                   help="each dLLM-Var model is scored with each (fixed_k: one token per step)")
    p.add_argument("--evaluate-every", type=int, default=0, help="also score every N steps (learning curves)")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="train each model once per seed (initial weights, batches, noise): the spread between "
                        "seeds is what one run's score is worth")
    p.add_argument("--skip-ar", action="store_true")
    p.add_argument("--baseline", help="over seeds, compare each variant with this one seed by seed (default: the "
                                      "first of --variants, or of the runs read)")
    p.add_argument("--from-json", nargs="+", metavar="FILE",
                   help="no training: report the runs of these earlier --json files together")
    p.add_argument("--json", help="write all results here")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds {args.seeds}: each seed once")
    if args.from_json:
        try:
            runs = load_runs(args.from_json)
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--from-json: {e}")
        report({"device": "from " + ", ".join(args.from_json), "args": vars(args), "runs": runs}, args, p)
        return
    if args.baseline is not None and args.baseline not in args.variants:
        p.error(f"--baseline {args.baseline} is not among --variants {args.variants}")

    tok, held, data, _ = build_data(args)
    cfg = model_config(tok, args.size)
    print(f"data: {len(data.packed().input_ids)} rows of {args.seq_len}; model {args.size}: "
          f"{cfg.num_parameters() / 1e6:.2f}M params; {args.steps} steps each", flush=True)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "args": vars(args), "runs": []}

    def save() -> None:  # after every run, so that a long run's results so far are on disk
        write_json(args.json, result)

    def record(name: str, info: dict, scored: dict, texts: list[str]) -> None:
        wrong = [{"prompt": s["instruction"], "want": s["output"], "got": t} for t, s in zip(texts, held) if t != s["output"]]
        # Right length, whatever the characters: how well the model knows where its answer ends.
        length_match = sum(len(t) == len(s["output"]) for t, s in zip(texts, held)) / len(held)
        run = {"variant": name, "seed": info["seed"], "training": info, **scored, "length_match": length_match,
               "per_task": per_task(texts, held), "wrong": wrong[:24]}
        result["runs"].append(run)
        print(f"{name} seed {info['seed']} [{scored['system']}]: EM {run['exact_match']:.1%} length {length_match:.1%} "
              f"stop {run['self_stopped']:.0%} TPF {run['tpf']:.2f} "
              f"last loss {info['loss_history'][-1][1] if info['loss_history'] else '-'} {run['per_task']}", flush=True)
        save()

    def score_engine(model, decoder: str) -> dict:
        engine = dllm.Engine(model, tok, max_batch_size=64, max_model_len=256)
        return eval_engine(engine, tok, held, decoder, 32, args, return_texts=True)

    def summary(scored: dict) -> dict:
        return {k: scored[k] for k in ("exact_match", "self_stopped", "tpf")}

    def score_twin(twin) -> dict:
        return eval_autoregressive(to_hf_llama(twin), tok, held, 32, args, return_texts=True)

    for seed in args.seeds:
        for name in args.variants:
            t0 = time.time()
            model, info = train("dllm-var", cfg, data, args, steps=args.steps, objective=VARIANTS[name],
                                evaluate_every=args.evaluate_every, seed=seed,
                                evaluate=lambda m: {d: summary(score_engine(m, d)) for d in args.decoders})
            for decoder in args.decoders:
                scored = score_engine(model, decoder)
                record(name, info, scored, scored.pop("texts"))
            print(f"  ({time.time() - t0:.0f}s)", flush=True)
        if not args.skip_ar:
            twin, info = train("autoregressive", cfg, data, args, steps=args.steps, evaluate_every=args.evaluate_every,
                               evaluate=lambda m: summary(score_twin(m)), seed=seed)
            scored = score_twin(twin)
            record("autoregressive twin", info, scored, scored.pop("texts"))

    report(result, args, p)


def report(result: dict, args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    """Every run, then (over seeds) each variant's mean and range and its seed-by-seed difference from the
    baseline, then the learning curves; the summaries go into the result file too."""
    print(f"\n{'objective':26} {'seed':>4} {'decoder':20} {'EM':>6} {'length':>6} {'stop':>5} {'TPF':>5}  per task")
    for r in result["runs"]:
        tasks = " ".join(f"{k} {v:.0%}" for k, v in r["per_task"].items())
        print(f"{r['variant']:26} {r['seed']:4d} {r['system'][:20]:20} {r['exact_match']:6.1%} {r['length_match']:6.1%} "
              f"{r['self_stopped']:5.0%} {r['tpf']:5.2f}  {tasks}")
    seeds = sorted({r["seed"] for r in result["runs"]})
    if len(seeds) > 1:
        result["over_seeds"] = over_seeds(result["runs"])
        width = max(len(row["variant"]) for row in result["over_seeds"])
        print(f"\nover {len(seeds)} seeds\n{'objective':{width}} {'decoder':20} {'EM mean':>7} {'min':>6} {'max':>6} "
              f"{'TPF':>5}  per task (mean)")
        for row in result["over_seeds"]:
            tasks = " ".join(f"{k} {v:.0%}" for k, v in row["per_task"].items())
            print(f"{row['variant']:{width}} {row['system'][:20]:20} {row['exact_match']:7.1%} "
                  f"{row['exact_match_min']:6.1%} {row['exact_match_max']:6.1%} {row['tpf']:5.2f}  {tasks}")
        baseline = args.baseline or result["runs"][0]["variant"]
        try:
            result["paired"] = paired_against(result["runs"], baseline)
        except ValueError as e:
            p.error(f"--baseline: {e}")
        if result["paired"]:
            print(f"\nseed by seed against {baseline} (exact match, points; 95 % interval of the mean difference)\n"
                  f"{'objective':{width}} {'decoder':20} {'mean':>6} {'95 % interval':>16} {'p (t)':>6} "
                  f"{'p (flip)':>8}  per seed")
            for row in result["paired"]:
                lo, hi = (100 * x for x in row["ci95"])
                flip = "-" if row["p_sign_flip"] is None else f"{row['p_sign_flip']:.3f}"
                print(f"{row['variant']:{width}} {row['system'][:20]:20} {100 * row['mean']:+6.1f} "
                      f"[{lo:+6.1f}, {hi:+6.1f}] {row['p_t']:6.3f} {flip:>8}  "
                      + " ".join(f"{100 * d:+.1f}" for d in row["differences"])
                      + ("  resolved" if row["resolved"] else ""))
    write_json(args.json, result)
    if args.evaluate_every:
        print_curves(result["runs"])

if __name__ == "__main__":
    main()
