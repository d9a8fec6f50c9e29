"""What priority scheduling buys urgent requests on a saturated engine, and what it costs the others.

    python -m benchmarks.priority_bench [--device cuda] [--max-batch-size 8] [--background 32] [--urgent 8]

The same arrivals twice on one engine configuration, first come first served and then scheduling_policy="priority":
`--background` requests (answers of 0.5-1.5x --max-new-tokens, cycling) queued at the start keep every slot busy; an
urgent request
(answers of --urgent-tokens, priority 0 against the background's 1) arrives every --urgent-every steps. A random
model never writes EOS, so every answer takes its cap and both runs decode the same tokens; its LM head is scaled
(--head-scale) so that blocks take varied numbers of steps and the running requests drift out of phase, as a
trained model's do (with a flat model every block takes B steps, a batch admitted together stays in one phase, one
forward a step, and any preemption looks costly by breaking that lockstep). Reported per policy and class:
latency from arrival to the last token (engine steps, exact, and seconds), p50 / p99; the preemptions; output
tokens/s while the engine is saturated (requests waiting: what a busy server sustains) and over the whole run (with
the drain at the end, where a finite workload leaves slots idle: preempted requests end later, some of them alone).
Then the ratios: the urgent requests' latency fcfs / priority, and the saturated tok/s priority / fcfs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dllm
from benchmarks.engine_bench import build_random_model
from benchmarks.report import write_json
from benchmarks.stats import percentile


LENGTH_SPREAD = (0.5, 1.25, 1.0, 1.5, 0.75)  # the background answers' lengths / --max-new-tokens (mean 1)


def run_policy(model, prompts: list[list[int]], policy: str, args) -> dict:
    b = args.block_size
    lengths = [max(b, round(args.max_new_tokens * LENGTH_SPREAD[i % len(LENGTH_SPREAD)] / b) * b)
               for i in range(args.background)]
    cap = max(lengths + [args.urgent_tokens])
    engine = dllm.Engine(model, max_batch_size=args.max_batch_size, scheduling_policy=policy, prefix_caching=False,
                         max_model_len=max(map(len, prompts)) + cap + 2 * args.block_size,
                         kv_cache_tokens=args.kv_cache_tokens)
    background = dllm.GenerationConfig(block_size=args.block_size, max_new_tokens=args.max_new_tokens, ignore_eos=True)
    urgent = background.replace(max_new_tokens=args.urgent_tokens)
    engine.generate(prompts[:args.max_batch_size], background)  # warm-up: compiles and captures outside the timing
    less_urgent = 1 if policy == "priority" else 0
    arrivals = {}  # request id -> (class, arrival step, arrival time)
    for i in range(args.background):
        config = background.replace(max_new_tokens=lengths[i])
        arrivals[engine.add_request(prompts[i % len(prompts)], config, priority=less_urgent)] = \
            ("background", 0, time.perf_counter())
    done, tokens, step = {}, 0, 0
    urgent_sent = 0
    saturated = {"steps": 0, "tokens": 0, "seconds": 0.0, "forwards": 0}  # the steps begun with requests waiting
    t0, forwards_before = time.perf_counter(), engine.total_forwards
    while engine.has_unfinished() or urgent_sent < args.urgent:
        if urgent_sent < args.urgent and step % args.urgent_every == args.urgent_every - 1:
            rid = engine.add_request(prompts[(args.background + urgent_sent) % len(prompts)], urgent, priority=0)
            arrivals[rid] = ("urgent", step, time.perf_counter())
            urgent_sent += 1
        busy, started, forwards = bool(engine.scheduler.waiting), time.perf_counter(), engine.total_forwards
        outputs = engine.step()
        if busy:  # the outputs' token counts are read on the host: the step has ended
            saturated["steps"] += 1
            saturated["forwards"] += engine.total_forwards - forwards
            saturated["tokens"] += sum(len(out.new_token_ids) for out in outputs)
            saturated["seconds"] += time.perf_counter() - started
        for out in outputs:
            if out.finished:
                done[out.request_id] = (step + 1, time.perf_counter())
                tokens += len(out.generation.token_ids)
        step += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    row = {"policy": policy, "steps": step, "forwards": engine.total_forwards - forwards_before, "seconds": seconds,
           "tokens": tokens, "tokens_per_s": tokens / seconds,
           "saturated": {**saturated, "tokens_per_s": saturated["tokens"] / max(saturated["seconds"], 1e-9),
                         "forwards_per_step": saturated["forwards"] / max(1, saturated["steps"])},
           "preemptions": engine.stats()["preemptions"]}
    for kind in ("urgent", "background"):
        ids = [rid for rid, (k, _, _) in arrivals.items() if k == kind]
        steps = [done[rid][0] - arrivals[rid][1] for rid in ids]
        secs = [done[rid][1] - arrivals[rid][2] for rid in ids]
        row[kind] = {"requests": len(ids), "p50_steps": statistics.median(steps), "p99_steps": percentile(steps, 0.99),
                     "p50_s": statistics.median(secs), "p99_s": percentile(secs, 0.99)}
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--background", type=int, default=32, help="requests queued at the start (priority 1)")
    p.add_argument("--urgent", type=int, default=8, help="urgent requests (priority 0), one every --urgent-every steps")
    p.add_argument("--urgent-every", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=64, help="the background answers' length")
    p.add_argument("--urgent-tokens", type=int, default=16, help="the urgent answers' length")
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--kv-cache-tokens", type=int, help="the K/V pool (default: max batch size x max model len)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--head-scale", type=float, default=20.0,
                   help="multiply the random model's LM head by this: peaked distributions, several tokens a step at "
                        "varied rates, so requests drift out of phase as a trained model's do")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    model = build_random_model(args).to(args.device, getattr(torch, args.dtype))
    with torch.no_grad():
        model.model.transformer["ff_out"].weight.mul_(args.head_scale)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, args.vocab - 8, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.background + args.urgent)]
    rows = [run_policy(model, prompts, policy, args) for policy in dllm.engine.SCHEDULING_POLICIES]
    fcfs, prio = rows
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "args": vars(args),
              "rows": rows,
              "urgent_p50_latency_fcfs_over_priority": fcfs["urgent"]["p50_s"] / prio["urgent"]["p50_s"],
              "urgent_p50_steps_fcfs_over_priority": fcfs["urgent"]["p50_steps"] / prio["urgent"]["p50_steps"],
              "saturated_tokens_per_s_priority_over_fcfs": prio["saturated"]["tokens_per_s"] / fcfs["saturated"]["tokens_per_s"],
              "tokens_per_s_priority_over_fcfs": prio["tokens_per_s"] / fcfs["tokens_per_s"]}
    print(f"{'policy':>9} {'class':>10} {'n':>3} {'p50 steps':>9} {'p99 steps':>9} {'p50 s':>8} {'p99 s':>8}")
    for row in rows:
        for kind in ("urgent", "background"):
            c = row[kind]
            print(f"{row['policy']:>9} {kind:>10} {c['requests']:3d} {c['p50_steps']:9.1f} {c['p99_steps']:9.1f} "
                  f"{c['p50_s']:8.3f} {c['p99_s']:8.3f}")
    for row in rows:
        print(f"{row['policy']}: {row['preemptions']} preemptions; saturated {row['saturated']['steps']} steps, "
              f"{row['saturated']['forwards_per_step']:.2f} forwards a step (one per phase present), "
              f"{row['saturated']['tokens_per_s']:.1f} tok/s; whole run {row['steps']} steps, {row['forwards']} forwards, "
              f"{row['tokens_per_s']:.1f} tok/s")
    print(f"urgent p50 latency: fcfs / priority = {result['urgent_p50_latency_fcfs_over_priority']:.2f}x "
          f"({result['urgent_p50_steps_fcfs_over_priority']:.2f}x in steps); tok/s priority / fcfs: saturated "
          f"{result['saturated_tokens_per_s_priority_over_fcfs']:.2f}, whole run {result['tokens_per_s_priority_over_fcfs']:.2f}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
