"""The engine's own cost per step (scheduling, page mapping, decoder bookkeeping) against the batch size.

    python -m benchmarks.step_overhead_bench [--batches 1 8 64 256] [--steps 64] [--profile] [--json out.json]

A small model serving many short answers spends much of each step outside the model: the host
schedules every running request, maps its pages and reads back which blocks finished, and on a GPU the
device waits for that. This runs N requests that never stop (random weights, ignore_eos) on a model so
small that its forward is cheap (d_model 32, one layer by default), times `engine.step()` in steady state,
and prints per batch size: ms per step, us per request per step, and that per-request cost against batch 1
measured in the same run (below 1: the step's fixed costs are shared; growing with N: a cost quadratic in
the batch, as the scheduler had before requests compared by identity). On a CPU the model's forwards are
timed too (synchronous there), so the rest of the step is the engine's own share (the decoder's tensor
work on the logits, scheduling, bookkeeping); on CUDA the forwards are
graph replays queued asynchronously and only the step is timed, once with the greedy decode step run
eagerly after the forward's graph and once replayed as a graph of its own (`decode_graphs`): the ratio is
the decode graph's gain. Batches above the largest graph bucket (64 rows) replay their graphs in
chunks of 64; for them a third run with no graphs at all gives the chunks' gain over one eager forward
(`vs no graphs`). `--profile` adds the engine functions that took the most time at the largest
batch (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

import dllm
from dllm.engine.cuda_graphs import GraphedForward
from benchmarks.report import write_json

MAX_GRAPH_ROWS = GraphedForward.max_rows()


def tiny_model(args) -> dllm.LLaDAModelLM:
    vocab = args.vocab
    cfg = dllm.LLaDAConfig(d_model=args.d_model, n_layers=args.layers, n_heads=2, n_kv_heads=2,
                           mlp_hidden_size=2 * args.d_model, vocab_size=vocab, embedding_size=vocab,
                           mask_token_id=vocab - 1, eos_token_id=vocab - 2, eot_token_id=None, bos_token_id=None,
                           pad_token_id=vocab - 2, max_sequence_length=4096)
    dtype = getattr(torch, args.dtype)
    return dllm.build_model(cfg, device=args.device, dtype=dtype, seed=0)


# How a step runs: the engine's defaults (on a CPU: no graphs), and on CUDA the forward's graph with the
# greedy decode after it eager or graphed (decode_graphs), or no graphs at all.
MODES = {"default": {}, "eager": {"decode_graphs": False}, "graph": {"decode_graphs": True},
         "no graphs": {"cuda_graphs": False}}


class ForwardTimer:
    """Wall time spent inside the model's forward calls (exact on a CPU, where every op is synchronous)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds = 0.0
        self._start = 0.0
        model.register_forward_pre_hook(self._before)
        model.register_forward_hook(self._after)

    def _before(self, *_) -> None:
        self._start = time.perf_counter()

    def _after(self, *_) -> None:
        self.seconds += time.perf_counter() - self._start


def measure(model, timer: ForwardTimer | None, args, batch: int, profile: bool, mode: str) -> dict:
    """Steady-state steps of `batch` requests that all run in every step."""
    cfg = dllm.GenerationConfig(block_size=args.block_size, max_new_tokens=args.max_new_tokens, ignore_eos=True)
    # compile_blocks off: on CUDA a step's forward is one graph replay either way, and compiling would take
    # longer than the measurement
    engine = dllm.Engine(model, max_batch_size=batch, max_model_len=args.prompt_len + args.max_new_tokens,
                         compile_blocks=False, **MODES[mode])
    g = torch.Generator().manual_seed(batch)
    for _ in range(batch):
        engine.add_request(torch.randint(0, args.vocab - 2, (args.prompt_len,), generator=g).tolist(), cfg)
    for _ in range(args.warmup):  # admission, prefills, graph capture
        engine.step()
    sync = torch.cuda.synchronize if model.embedding_weight.is_cuda else (lambda: None)
    forwards, running = engine.total_forwards, []
    prof = cProfile.Profile() if profile else None
    sync()
    if timer is not None:
        timer.seconds = 0.0
    start = time.perf_counter()
    if prof is not None:
        prof.enable()
    for _ in range(args.steps):
        engine.step()
        running.append(len(engine.scheduler.running))  # not engine.stats(): its sums would add to the step
    if prof is not None:
        prof.disable()
    sync()
    seconds = time.perf_counter() - start
    if min(running) != batch:
        raise SystemExit(f"only {min(running)} of {batch} requests ran in some timed step: raise --max-new-tokens")
    row = {"batch": batch, "mode": mode, "decode_graphs": engine.decode_graphs, "steps": args.steps,
           "forwards": engine.total_forwards - forwards,
           "ms_per_step": 1e3 * seconds / args.steps,
           "us_per_request_step": 1e6 * seconds / args.steps / batch}
    if timer is not None:
        row["model_ms_per_step"] = 1e3 * timer.seconds / args.steps
        row["engine_ms_per_step"] = row["ms_per_step"] - row["model_ms_per_step"]
    if prof is not None:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(r"dllm[/\\]engine", 15)
        row["profile"] = text.getvalue()
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    p.add_argument("--steps", type=int, default=64, help="timed steps per batch size")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="each answer's cap: it must outlast the warm-up and timed steps")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (1: the host's share is clearest)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    model = tiny_model(args)
    timer = ForwardTimer(model) if args.device == "cpu" else None
    # With CUDA graphs the greedy rows' decode step runs eagerly after the forward's graph, or as a graph
    # of its own (Engine decode_graphs): both, batch by batch, in the same run; batches that replay graphs
    # in chunks also without graphs.
    cuda = args.device.startswith("cuda")
    print(f"{'batch':>6} {'step':>9} {'ms/step':>9} {'us/request/step':>16} {'vs batch ' + str(args.batches[0]):>11}"
          + (f" {'vs eager decode':>16} {'vs no graphs':>13}" if cuda else "")
          + (f" {'model ms':>9} {'engine ms':>10} {'engine share':>13}" if timer else ""), flush=True)
    rows = []
    for n in args.batches:  # each row printed as it is measured: a run cut short still shows what it did
        modes = ["default"] if not cuda else (["no graphs"] if n > MAX_GRAPH_ROWS else []) + ["eager", "graph"]
        for mode in modes:
            r = measure(model, timer, args, n, args.profile and n == max(args.batches), mode)
            first = next((x for x in rows if x["mode"] == mode), r)
            r["per_request_vs_first"] = r["us_per_request_step"] / first["us_per_request_step"]
            rows.append(r)
            line = (f"{n:>6} {mode:>9} {r['ms_per_step']:>9.2f} "
                    f"{r['us_per_request_step']:>16.1f} {r['per_request_vs_first']:>10.2f}x")
            same = {x["mode"]: x for x in rows if x["batch"] == n}
            if mode == "graph":  # the step with its decode graphed against the eager decode's, same batch
                r["vs_eager_decode"] = same["eager"]["ms_per_step"] / r["ms_per_step"]
                line += f" {r['vs_eager_decode']:>15.2f}x"
            elif cuda:
                line += f" {'':>16}"
            if "no graphs" in same and mode != "no graphs":  # chunked graph replays against one eager forward
                r["vs_no_graphs"] = same["no graphs"]["ms_per_step"] / r["ms_per_step"]
                line += f" {r['vs_no_graphs']:>12.2f}x"
            elif cuda:
                line += f" {'':>13}"
            if timer:
                line += f" {r['model_ms_per_step']:>9.2f} {r['engine_ms_per_step']:>10.2f} " \
                        f"{r['engine_ms_per_step'] / r['ms_per_step']:>12.0%}"
            print(line, flush=True)
    for r in rows:
        if "profile" in r:
            print(f"\nengine functions by own time, batch {r['batch']}:\n{r['profile']}")
    result = {"device": str(model.embedding_weight.device), "dtype": args.dtype, "d_model": args.d_model,
              "layers": args.layers, "block_size": args.block_size, "prompt_len": args.prompt_len, "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
