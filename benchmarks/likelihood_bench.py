"""Multiple choice by log-likelihood on a trained checkpoint, beside generation on the same prompts.

    python -m benchmarks.likelihood_bench --model DIR --prompts-jsonl heldout.jsonl [--json out.json]

LLaDA reports most benchmarks as multiple choice: each answer's ELBO estimate of log p(answer |
prompt) (`dllm.log_likelihood`), the highest wins. Per held-out prompt the choices are its true
answer and `--distractors` wrong ones of one kind:
- other: answers of other prompts of the same task (the right format, the wrong content);
- edit:  the true answer with one character replaced (near misses).
Each answer is scored with the EOS that ends it (the model was trained to end answers so; without
it a prefix of the truth would score as well as the truth). The table has the accuracy per kind
and Monte Carlo draws, chance, and seconds per scored answer; the engine's exact match on the same
prompts (threshold decoder, greedy) is measured in the same run for reference. For each wrong
generation the report says whether the model scores the truth above what it generated (a search
error of the decoder) or not (a model error).

`--rerank-samples N` asks whether the likelihood can fix search errors at generation time (best-of
by ELBO): per prompt the candidates are the greedy threshold answer, the one-token-per-step answer
(fixed_k 1, the slowest and most careful decoder) and N samples at temperature 1; the report has
each decoder alone, the oracle (any candidate right), a majority vote and the ELBO's pick.
"""

from __future__ import annotations

import argparse
import random
import time

import dllm
from benchmarks.checkpoint_args import add_checkpoint_arguments, load_checkpoint
from benchmarks.report import write_json


def distractors(row: dict, rows: list[dict], kind: str, count: int, rng: random.Random) -> list[str]:
    truth = row["output"]
    if kind == "other":
        pool = sorted({r["output"] for r in rows if r.get("task") == row.get("task") and r["output"] != truth})
        if len(pool) < count:  # a rare task: fill from every task
            pool += sorted({r["output"] for r in rows if r["output"] != truth} - set(pool))
        if len(pool) < count:
            raise ValueError(f"only {len(pool)} other answers in the prompts file; lower --distractors")
        return rng.sample(pool, count)
    alphabet = sorted(set("".join(r["output"] for r in rows)) - {" "})
    out: list[str] = []
    for _ in range(1000 * count):
        if len(out) == count:
            return out
        i = rng.randrange(len(truth))
        wrong = truth[:i] + rng.choice([c for c in alphabet if c != truth[i]]) + truth[i + 1:]
        if wrong not in out:
            out.append(wrong)
    if len(out) < count:
        raise ValueError(f"cannot make {count} one-character edits of {truth!r}; lower --distractors")
    return out


def run(args) -> dict:
    model, tok, rows = load_checkpoint(args)
    eos = model.config.eos_token_id
    scored = rows[: args.num_prompts]
    prompts = [tok(r["instruction"] + r.get("input", ""), add_special_tokens=False)["input_ids"] for r in scored]

    engine = dllm.Engine(model, tok, max_batch_size=args.batch, max_model_len=args.max_model_len)
    cfg = dllm.GenerationConfig(block_size=args.block_size, max_new_tokens=args.max_new_tokens, early_stop=True)

    def generate(config_of) -> list[str]:
        """Answers of every prompt, config_of(prompt index) decoding each."""
        texts = []
        for i in range(0, len(prompts), args.batch):
            batch = range(i, min(i + args.batch, len(prompts)))
            texts += [g.text for g in engine.generate([prompts[j] for j in batch], [config_of(j) for j in batch])]
        return texts

    def exact_match(texts: list[str]) -> float:
        return sum(t == r["output"] for t, r in zip(texts, scored)) / len(scored)

    greedy = generate(lambda j: cfg)
    generation = {"exact_match": exact_match(greedy)}

    def elbo(prompt: list[int], answer: str, mc: int) -> float:
        ids = tok(answer, add_special_tokens=False)["input_ids"] + [eos]
        return dllm.log_likelihood(model, prompt, ids, mc_samples=mc, batch_size=args.score_batch, seed=args.seed).value

    wrong = [(p, text, r["output"]) for p, text, r in zip(prompts, greedy, scored) if text != r["output"]]
    search_errors = sum(elbo(p, truth, max(args.mc_samples)) > elbo(p, text, max(args.mc_samples))
                        for p, text, truth in wrong)
    generation.update(wrong=len(wrong), truth_scores_higher=search_errors)

    results = []
    for kind in args.kinds:
        rng = random.Random(args.seed)
        choices = [[r["output"]] + distractors(r, rows, kind, args.distractors, rng) for r in scored]
        for mc in args.mc_samples:
            right, t0 = 0, time.perf_counter()
            for prompt, options in zip(prompts, choices):
                values = [elbo(prompt, o, mc) for o in options]
                right += max(range(len(values)), key=values.__getitem__) == 0
            secs = time.perf_counter() - t0
            results.append({"distractors": kind, "mc_samples": mc, "prompts": len(scored),
                            "choices": args.distractors + 1, "accuracy": right / len(scored),
                            "chance": 1 / (args.distractors + 1),
                            "seconds_per_answer": secs / (len(scored) * (args.distractors + 1))})
            print(results[-1], flush=True)
    report = {"device": args.device, "model": args.model, "generation": generation, "results": results}
    if args.rerank_samples:
        careful = generate(lambda j: cfg.replace(decoder="fixed_k", tokens_per_step=1))
        samples = [generate(lambda j, s=s: cfg.replace(temperature=1.0, seed=args.seed + s * len(prompts) + j))
                   for s in range(args.rerank_samples)]
        mc = max(args.mc_samples)
        picks, votes, oracle = [], [], 0
        for j, prompt in enumerate(prompts):
            candidates = list(dict.fromkeys([greedy[j], careful[j]] + [s[j] for s in samples]))
            values = [elbo(prompt, c, mc) for c in candidates]
            picks.append(candidates[max(range(len(candidates)), key=values.__getitem__)])
            every = [greedy[j], careful[j]] + [s[j] for s in samples]
            votes.append(max(candidates, key=every.count))
            oracle += scored[j]["output"] in candidates
        report["rerank"] = {"samples": args.rerank_samples, "mc_samples": mc, "greedy_threshold": exact_match(greedy),
                            "fixed_k_1": exact_match(careful), "oracle": oracle / len(scored),
                            "majority_vote": exact_match(votes), "elbo_pick": exact_match(picks)}
        print(report["rerank"], flush=True)
    return report


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p, "Alpaca-style jsonl with instruction/input/output[/task]")
    p.add_argument("--distractors", type=int, default=3, help="wrong answers per prompt")
    p.add_argument("--kinds", nargs="+", default=["other", "edit"], choices=["other", "edit"])
    p.add_argument("--mc-samples", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--score-batch", type=int, default=64, help="masked draws per forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16, help="prompts decoded together for the generation reference")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--rerank-samples", type=int, default=0,
                   help="also pick the best of this many samples (+ the greedy and fixed_k answers) by ELBO")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.distractors < 1:
        p.error("--distractors must be >= 1")
    report = run(args)
    g = report["generation"]
    print(f"\ngeneration (engine, greedy threshold): exact match {g['exact_match']:.1%}; of its {g['wrong']} wrong "
          f"answers the model scores the truth higher in {g['truth_scores_higher']} (decoder search errors)")
    print(f"{'distractors':12} {'draws':>6} {'accuracy':>9} {'chance':>7} {'s/answer':>9}")
    for r in report["results"]:
        print(f"{r['distractors']:12} {r['mc_samples']:6d} {r['accuracy']:9.1%} {r['chance']:7.1%} "
              f"{r['seconds_per_answer']:9.4f}")
    if "rerank" in report:
        r = report["rerank"]
        print(f"exact match: greedy threshold {r['greedy_threshold']:.1%}, fixed_k 1 {r['fixed_k_1']:.1%}; of "
              f"{r['samples'] + 2} candidates: oracle {r['oracle']:.1%}, majority vote {r['majority_vote']:.1%}, "
              f"ELBO's pick {r['elbo_pick']:.1%}")
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
