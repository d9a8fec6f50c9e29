"""One decode step at LLaDA-8B's shape against the memory roofline, and an autoregressive HF Llama
of the same shape (the GPU half of issue 7, goals 1 and 2).

    python -m benchmarks.decode_step_bench [--contexts 512 2048] [--block 64] [--json out.json]

A decode step at batch 1 is memory-bound: every weight is read once per forward whether the
forward carries 1 token (AR) or 64 (a block). The roofline time of a step is
    (bytes of weights read + bytes of K/V read) / HBM bandwidth,
with the bandwidth measured in this run by a device-to-device copy (bytes read + written).
Weights read per step: every matrix except the embedding table (only the block's rows of it).

Timed per context length (random bf16 weights; CUDA events, median of many):
- forward, eager, gather + SDPA attention (the portable path)
- forward, eager, pool-attention kernel
- forward, CUDA graph (what the engine replays): the DENOISE step [B] and the COMMIT step [2B]
- one full engine step (forward + decoder + block bookkeeping + the host sync); with CUDA graphs, the
  decoder run eagerly and replayed as a graph (Engine decode_graphs) in the same run
each with eager blocks, compiled blocks, compiled blocks with fused Q/K/V and gate/up matrices, and
compiled blocks with FP8 weights (Engine quantization="fp8": its roofline counts one byte per projection
weight; the table ends with its speedup over the bf16 step) (on a CPU: eager, fused, FP8); then Hugging Face's LlamaForCausalLM of the same shape, `generate` with a static cache and its
automatic torch.compile, per generated token; and the ratio block step / AR token.
`--profile` writes a torch.profiler table of one eager step (where the time goes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.report import write_json
import dllm
from dllm.engine.memory import kv_bytes_per_token
from dllm.model import CacheView


def llada_8b_config(vocab: int = 126464) -> dllm.LLaDAConfig:
    return dllm.LLaDAConfig(vocab_size=vocab, embedding_size=vocab, mask_token_id=vocab - 128, eos_token_id=vocab - 127,
                            eot_token_id=None, bos_token_id=None, pad_token_id=vocab - 127)


def small_config() -> dllm.LLaDAConfig:
    return dllm.LLaDAConfig(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=768, vocab_size=1024,
                            embedding_size=1024, mask_token_id=1000, eos_token_id=1001, eot_token_id=None,
                            bos_token_id=None, pad_token_id=1001, max_sequence_length=4096)


def time_cuda(fn, iters: int = 30, warmup: int = 3) -> float:
    """Median milliseconds of fn() by CUDA events (CPU: perf_counter)."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def hbm_bandwidth_gbs(device) -> float:
    """Device-to-device copy of 2 GiB: (bytes read + written) / time."""
    n = 2 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), iters=20)
    del src, dst
    return 2 * n / (ms / 1e3) / 1e9


def weight_bytes_per_step(model: dllm.LLaDAModelLM) -> int:
    emb = model.embedding_weight
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])  # FP8: buffers
    return total - emb.numel() * emb.element_size()  # the embedding is only gathered


def kv_bytes(cfg: dllm.LLaDAConfig, tokens: int) -> int:
    """K and V of `tokens` cache positions in bf16."""
    return tokens * kv_bytes_per_token(cfg, torch.bfloat16)


def step_rows(model, engine, ctx: int, block: int, bw: float, args, label: str) -> list[dict]:
    cfg, dev = model.config, engine.device
    slot = engine.cache.allocate(ctx + 2 * block)
    engine.cache.k.normal_()  # a filled cache: values matter for nothing but realism
    engine.cache.v.normal_()
    ids_b = torch.randint(0, cfg.vocab_size - 200, (1, block), device=dev)
    ids_2b = torch.randint(0, cfg.vocab_size - 200, (1, 2 * block), device=dev)
    w_bytes = weight_bytes_per_step(model)
    rows = []

    def eager(ids, logits_start, kernel: bool):
        q = ids.shape[1]
        model.use_pool_kernel = kernel
        view = CacheView(engine.cache.k, engine.cache.v, engine.cache.table, slots=torch.tensor([slot], device=dev),
                         offsets=torch.tensor([ctx], device=dev), window=ctx + q)
        index = torch.arange(logits_start, logits_start + block, device=dev)[None]
        return lambda: model(ids, cache=view, logits_index=index)

    def add(name, ms, q_tokens):
        roof_bytes = w_bytes + kv_bytes(cfg, ctx + q_tokens)
        roof_ms = roof_bytes / (bw * 1e9) * 1e3
        rows.append({"context": ctx, "step": f"{name} [{label}]", "ms": ms, "roofline_ms": roof_ms,
                     "efficiency": roof_ms / ms, "name": name, "variant": label})

    with torch.inference_mode():
        kernel_ok = model.enable_pool_kernel()
        if label == "eager blocks":
            add("forward B, eager, gather+SDPA", time_cuda(eager(ids_b, 0, False), args.iters), block)
        if kernel_ok:
            add("forward B, eager, pool kernel", time_cuda(eager(ids_b, 0, True), args.iters), block)
        model.use_pool_kernel = kernel_ok
        if engine.graphs is not None:
            add("forward B, CUDA graph (DENOISE)",
                time_cuda(lambda: engine.graphs.run(ids_b, [slot], [ctx], 0, block), args.iters), block)
            add("forward 2B, CUDA graph (COMMIT+next)",
                time_cuda(lambda: engine.graphs.run(ids_2b, [slot], [ctx], block, block), args.iters), 2 * block)
    engine.cache.release(slot)

    # A full engine step: a request whose prompt fills the context, timed over denoise steps (threshold 1:
    # each step commits one token, so steps stay DENOISE). With CUDA graphs, the greedy decode step eagerly
    # after the forward's graph, then replayed as a graph too (Engine decode_graphs), in the same run.
    modes = [(False, ", decode eager"), (True, ", decode graphed")] if engine.graphs is not None else [(False, "")]
    for decode_graphs, suffix in modes:
        engine.decode_graphs = decode_graphs
        prompt = torch.randint(0, cfg.vocab_size - 200, (ctx,)).tolist()
        gcfg = dllm.GenerationConfig(block_size=block, max_new_tokens=block, threshold=1.0)
        rid = engine.add_request(prompt, gcfg)
        engine.step()  # prefill
        engine.step()  # the first DENOISE step (a decode graph's capture)
        n = min(args.iters, block - 3)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        t0 = time.perf_counter()
        for _ in range(n):
            engine.step()
        ms = (time.perf_counter() - t0) * 1e3 / n
        engine.abort(rid)
        engine.step()
        add(f"engine.step() (forward + decode + sync{suffix})", ms, block)
    return rows


def profile_step(model, engine, ctx: int, block: int, path: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    dev = engine.device
    slot = engine.cache.allocate(ctx + block)
    view = CacheView(engine.cache.k, engine.cache.v, engine.cache.table, slots=torch.tensor([slot], device=dev),
                     offsets=torch.tensor([ctx], device=dev), window=ctx + block)
    ids = torch.randint(0, 1000, (1, block), device=dev)
    index = torch.arange(block, device=dev)[None]
    with torch.inference_mode():
        for _ in range(3):
            model(ids, cache=view, logits_index=index)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            for _ in range(5):
                model(ids, cache=view, logits_index=index)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    engine.cache.release(slot)
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25)
    with open(path, "w") as f:
        f.write(table)
    return table


class _TokenClock:
    """A `generate` streamer that notes when each new token arrives (generate syncs per token anyway)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_llama_rows(cfg: dllm.LLaDAConfig, ctx: int, args) -> list[dict]:
    """Per-token decode time of HF LlamaForCausalLM: `generate` with a static cache (and, on CUDA,
    its automatic torch.compile); the median gap between consecutive tokens of one generate call."""
    from benchmarks.ar_twin import random_llama

    llama = random_llama(cfg, args.device, getattr(torch, args.dtype))
    prompt = torch.randint(0, cfg.vocab_size - 200, (1, ctx), device=args.device)
    n = args.hf_tokens

    def gen(streamer=None):
        return llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, eos_token_id=None, pad_token_id=cfg.pad_token_id,
                              cache_implementation="static", streamer=streamer)

    t0 = time.perf_counter()
    gen()  # compiles the decode step (first call of this shape)
    compile_s = time.perf_counter() - t0
    clock = _TokenClock()
    gen(clock)
    gaps = [b - a for a, b in zip(clock.times[2:], clock.times[3:])]  # [0] is the prompt, [1] the prefill token
    ms = 1e3 * statistics.median(gaps)
    print(f"  HF generate, context {ctx}: {ms:.3f} ms/token (first call incl. compile {compile_s:.0f}s)", flush=True)
    del llama
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [{"context": ctx, "system": "HF LlamaForCausalLM generate (static cache + compile)", "ms_per_token": ms,
             "tokens_per_s": 1e3 / ms, "first_call_s": compile_s}]


def fp8_speedups(rows: list[dict]) -> list[dict]:
    """Per context and step: ms of the unquantised variant the FP8 one differs from only by its
    weights (compiled, or eager on a CPU) over ms with FP8 weights, measured in the same run."""
    out = []
    for r in rows:
        if not r["variant"].endswith(", FP8 weights"):
            continue
        base_variant = r["variant"].removesuffix(", FP8 weights")
        base = next((b for b in rows if b["variant"] == base_variant and b["name"] == r["name"]
                     and b["context"] == r["context"]), None)
        if base is not None:
            out.append({"context": r["context"], "step": r["name"], "against": base_variant,
                        "speedup": base["ms"] / r["ms"]})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["llada-8b", "small"], default="llada-8b")
    p.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--hf", action="store_true", help="also time the HF autoregressive Llama of the same shape")
    p.add_argument("--hf-tokens", type=int, default=128, help="tokens per HF generate call")
    p.add_argument("--variants", nargs="+", choices=["eager", "compiled", "fused", "fp8"],
                   help="block functions to time (default: all four)")
    p.add_argument("--profile", help="write torch.profiler tables of eager steps to PROFILE.{eager,compiled}.txt")
    p.add_argument("--json", help="write all results here")
    args = p.parse_args(argv)

    cfg = llada_8b_config() if args.shape == "llada-8b" else small_config()
    dev = torch.device(args.device)
    bw = hbm_bandwidth_gbs(dev) if dev.type == "cuda" else 20.0
    print(f"device {dev} bandwidth {bw:.0f} GB/s (copy, read+write)", flush=True)
    model = dllm.build_model(cfg, device=dev, dtype=getattr(torch, args.dtype))
    n_params = sum(p.numel() for p in model.parameters())
    max_ctx = max(args.contexts)
    print(f"model {args.shape}: {n_params / 1e9:.2f}B params, weights read per step "
          f"{weight_bytes_per_step(model) / 1e9:.2f} GB", flush=True)
    rows = []
    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "bandwidth_gbs": bw,
              "params": n_params, "block": args.block, "steps": rows}

    def save():  # after every variant: a run cut short by its time limit keeps what it measured
        write_json(args.json, result)

    # Eager blocks (~50 small kernels per layer), torch.compile'd blocks, then the same with one Q/K/V and
    # one gate/up matmul per block, then with FP8 weights (fusing and quantising are one-way on a model, so
    # they come last). (label, kind, compiled, fused, quantization)
    variants = [("eager blocks", "eager", False, False, None), ("compiled blocks", "compiled", True, False, None),
                ("compiled blocks, fused QKV+gate/up", "fused", True, True, None),
                ("compiled blocks, FP8 weights", "fp8", True, False, "fp8")]
    if dev.type != "cuda":  # nothing compiles for graphs on a CPU: eager, fused, FP8
        variants = [("eager blocks", "eager", False, False, None),
                    ("eager blocks, fused QKV+gate/up", "fused", False, True, None),
                    ("eager blocks, FP8 weights", "fp8", False, False, "fp8")]
    variants = [v for v in variants if args.variants is None or v[1] in args.variants]
    for label, _, compiled, fused, quantization in variants:
        engine = dllm.Engine(model, max_batch_size=1, max_model_len=max_ctx + 3 * args.block, compile_blocks=compiled,
                             fuse_projections=fused, quantization=quantization)
        t0 = time.perf_counter()
        for ctx in args.contexts:
            rows += step_rows(model, engine, ctx, args.block, bw, args, label)
        print(f"{label}: measured in {time.perf_counter() - t0:.0f}s (compiles included)", flush=True)
        if args.profile:
            slug = label.split()[0] + ("-fused" if fused else "") + (f"-{quantization}" if quantization else "")
            profile_step(model, engine, max_ctx, args.block, f"{args.profile}.{slug}.txt")
        del engine
        save()
    print(f"\n{'context':>7}  {'step':60} {'ms':>8} {'roofline ms':>11} {'of roofline':>11}")
    for r in rows:
        print(f"{r['context']:7d}  {r['step']:60} {r['ms']:8.3f} {r['roofline_ms']:11.3f} {r['efficiency']:10.0%}")
    result["fp8_speedup"] = fp8_speedups(rows)
    if result["fp8_speedup"]:
        print(f"\nFP8 weights against the same step in the model's dtype ({result['fp8_speedup'][0]['against']}):")
        for r in result["fp8_speedup"]:
            print(f"{r['context']:7d}  {r['step']:60} {r['speedup']:7.2f}x")
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    save()
    if args.hf:
        ar = []
        for ctx in args.contexts:
            ar += hf_llama_rows(cfg, ctx, args)
        result["autoregressive"] = ar
        graph_ms, step_ms = {}, {}
        for r in rows:  # our fastest variant of each
            if r["step"].startswith("forward B, CUDA graph"):
                graph_ms[r["context"]] = min(r["ms"], graph_ms.get(r["context"], float("inf")))
            if r["step"].startswith("engine.step"):
                step_ms[r["context"]] = min(r["ms"], step_ms.get(r["context"], float("inf")))
        print(f"\n{'context':>7}  {'HF AR ms/token':>14} {'our block step ms':>17} {'block/AR':>8}")
        for a in ar:
            ours = graph_ms.get(a["context"], step_ms[a["context"]])
            a["block_step_over_ar_token"] = ours / a["ms_per_token"]
            print(f"{a['context']:7d}  {a['ms_per_token']:14.3f} {ours:17.3f} {a['block_step_over_ar_token']:8.2f}")
        save()


if __name__ == "__main__":
    main()
