"""Engine speed against the baselines, on the same model and prompts, in one run.

    python -m benchmarks.engine_bench [--model DIR] [--device cuda] [--json out.json]

Without --model a random LLaDA-shaped model is built (--d-model/--layers/...): its answers are
meaningless and never hit EOS, so every system decodes up to the same cap and the ratio measures
the inference algorithm alone (cache, blocks, parallel commits). With a trained checkpoint
(e.g. the quickstart's) and its held-out prompts (--prompts-jsonl) the answers are real.

Reports per system: output tokens (before the first EOS), forwards (NFE), TPF, wall seconds, TPS,
and the TPS speedup over LLaDA vanilla measured in this run. `--logprobs K` adds, per decoder, the
same decoding returning each token's log-probability and K alternatives (GenerationConfig.logprobs):
its TPS against the row above is the cost of logprobs. `--top-p P` adds, per decoder, sampled decoding
(temperature 1), then with top_p P (which ranks the engine's `nucleus_candidates` most likely tokens, and the
whole vocabulary only at positions whose nucleus is wider), the same ranking the whole vocabulary at every
block position (nucleus_candidates 0, as before 2026-12-06), then with top_p P and top_k 50 (which ranks 50):
their TPS against the plain sampled row is the cost of narrowing, and the first two's ratio what ranking a few
candidates first saves. A random model's distributions are nearly flat, its nucleus most of the vocabulary;
`--head-scale S` multiplies its LM head by S, so that they are peaked (the run prints the nucleus's median size at
the first block's positions).
`--penalties` adds, per decoder, the same greedy decoding with presence, frequency and repetition penalties
(per-row token counts over the vocabulary, updated on the device each step): its TPS against the plain row is
their cost. `--samples N` adds N sampled answers per prompt decoded together (an OpenAI `n`), once with the engine's
shared prefill (one prefill row per prompt, its K/V copied to the other N-1 slots) and once with every row
prefilled: their ratio is what sharing saves, most with long prompts (--prompt-len). `--prefix-caching` decodes
the prompts once, then again timed, with the engine's prefix cache (each request finds its prompt's K/V in a
free slot and skips its prefill) and without: their ratio is what the cache saves on prompts asked again.
`--kv-cache-tokens T` decodes all the prompts submitted at once in a K/V pool of T tokens, four times in
the same memory: with a slot of `--pool-max-model-len` positions per request (what a cache without pages
reserves whatever the request's length: T // max_model_len requests at a time); paged, each request
reserving the pages of its prompt and max_new_tokens at admission (page_allocation="reserve"); and paged
on demand, block by block as answers grow, preempting the newest request when the pool runs out (the
default), its K/V swapped to host memory and back (preemption_mode="swap", the default) or dropped and
rebuilt by forwards ("recompute"). It reports the peak number of requests decoded together, the
preemptions and the K/V positions rebuilt beside the TPS: recompute's tok/s against swap's is what
rebuilding costs against the host round trip. A random model never stops, so every answer takes
max_new_tokens; with a trained checkpoint (--model, --prompts-jsonl) answers end at their EOS, far below a
max_new_tokens that a client sets for safety, which is where reserving pages for max_new_tokens costs most.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.report import write_json
import dllm
from dllm.baselines import fast_dllm_generate, llada_generate
from dllm.engine.decoders import NUCLEUS_CANDIDATES


def build_random_model(args) -> dllm.LLaDAModelLM:
    cfg = dllm.LLaDAConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                           mlp_hidden_size=args.d_model * 3, vocab_size=args.vocab, embedding_size=args.vocab,
                           mask_token_id=args.vocab - 1, eos_token_id=args.vocab - 2, eot_token_id=None,
                           bos_token_id=None, pad_token_id=args.vocab - 2, max_sequence_length=4096)
    return dllm.build_model(cfg, seed=0)


def load_prompts(args, model, tokenizer) -> list[list[int]]:
    if args.prompts_jsonl:
        rows = [json.loads(line) for line in open(args.prompts_jsonl) if line.strip()][: args.num_prompts]
        return [tokenizer((r.get("instruction", "") + r.get("input", "")), add_special_tokens=False)["input_ids"]
                for r in rows]
    g = torch.Generator().manual_seed(0)
    hi = min(model.config.vocab_size, model.config.mask_token_id) - 2
    return [torch.randint(0, hi, (args.prompt_len,), generator=g).tolist() for _ in range(args.num_prompts)]


def nucleus_size(model, prompt: list[int], args) -> float:
    """Median tokens in the top_p nucleus (temperature 1) at the positions of a first block of masks."""
    device = model.embedding_weight.device
    ids = torch.tensor([prompt + [model.config.mask_token_id] * args.block_size], device=device)
    with torch.no_grad():
        logits = model(ids)[0, len(prompt):].float()
    probs = torch.softmax(logits, -1).sort(-1, descending=True).values
    sizes = ((probs.cumsum(-1) - probs) < args.top_p).sum(-1)
    return sizes.float().median().item()


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def run(args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    if args.model:
        model = dllm.load_model(args.model, device=args.device, dtype=dtype)
        tokenizer = dllm.load_tokenizer(args.model)
    else:
        model, tokenizer = build_random_model(args).to(args.device, dtype), None
        with torch.no_grad():
            model.model.transformer["ff_out"].weight.mul_(args.head_scale)
    prompts = load_prompts(args, model, tokenizer)
    if args.top_p is not None:
        print(f"nucleus at top_p {args.top_p}, temperature 1: median {nucleus_size(model, prompts[0], args):.0f} "
              f"of {model.config.embedding_size} tokens at the first block's positions", flush=True)
    b, cap = args.block_size, args.max_new_tokens
    cap = -(-cap // b) * b
    # Every variant decodes the same prompts: no prefix caching, or the later ones would skip their prefills.
    engine = dllm.Engine(model, max_batch_size=args.batch, max_model_len=max(map(len, prompts)) + cap + 2 * b,
                         prefix_caching=False)
    results = []

    def record(name, tokens, forwards, seconds, requests):
        n_tok = sum(len(t) for t in tokens)
        results.append({"system": name, "requests": requests, "tokens": n_tok, "forwards": forwards,
                        "tpf": n_tok / max(1, forwards), "seconds": seconds, "tps": n_tok / seconds})

    def decode(cfg):
        if args.batch == 1:  # batch 1: one request at a time, as the papers measure
            return timed(lambda: [engine.generate([p], cfg)[0] for p in prompts])
        return timed(lambda: engine.generate(prompts, cfg))

    engine.generate(prompts[:1], dllm.GenerationConfig(block_size=b, max_new_tokens=b))  # warm-up
    ranked_whole = set()  # variants decoded with nucleus_candidates 0: the whole vocabulary ranked for top_p
    for decoder in args.decoders:
        cfg = dllm.GenerationConfig(block_size=b, max_new_tokens=cap, threshold=args.threshold, decoder=decoder)
        variants = [(f"dllm-var engine ({decoder})", cfg)]
        if args.logprobs is not None:
            variants.append((f"dllm-var engine ({decoder}, logprobs {args.logprobs})",
                             cfg.replace(logprobs=args.logprobs)))
        if args.top_p is not None:
            sampled = cfg.replace(temperature=1.0, seed=0)
            whole_vocabulary = f"dllm-var engine ({decoder}, sampled, top_p {args.top_p}, whole vocabulary ranked)"
            ranked_whole.add(whole_vocabulary)
            variants += [(f"dllm-var engine ({decoder}, sampled)", sampled),
                         (f"dllm-var engine ({decoder}, sampled, top_p {args.top_p})", sampled.replace(top_p=args.top_p)),
                         (whole_vocabulary, sampled.replace(top_p=args.top_p)),
                         (f"dllm-var engine ({decoder}, sampled, top_p {args.top_p}, top_k 50)",
                          sampled.replace(top_p=args.top_p, top_k=50))]
        if args.penalties:
            variants.append((f"dllm-var engine ({decoder}, presence, frequency and repetition penalties)",
                             cfg.replace(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.1)))
        for name, config in variants:
            engine.nucleus_candidates = 0 if name in ranked_whole else args.nucleus_candidates
            gens, secs = decode(config)
            record(name, [g.token_ids for g in gens], sum(g.num_forwards for g in gens), secs, len(prompts))
    for share in (True, False) if args.samples else ():
        group = dllm.Engine(model, max_batch_size=args.samples, max_model_len=engine.max_model_len,
                            share_prefills=share, prefix_caching=False)
        cfg = dllm.GenerationConfig(block_size=b, max_new_tokens=cap, threshold=args.threshold, temperature=1.0)
        configs = [cfg.replace(seed=s) for s in range(args.samples)]
        group.generate(prompts[:1] * args.samples, configs)  # warm-up
        gens, secs = timed(lambda: [g for p in prompts for g in group.generate([p] * args.samples, configs)])
        how = "shared prefill" if share else "every row prefilled"
        record(f"dllm-var engine ({args.samples} samples per prompt, {how})", [g.token_ids for g in gens],
               sum(g.num_forwards for g in gens), secs, len(gens))
    for cached in (True, False) if args.prefix_caching else ():
        # The prompts asked again: with the cache each request skips its prefill (the pool keeps every
        # prompt's pages); decoded `--batch` at a time.
        again = dllm.Engine(model, max_batch_size=max(args.batch, len(prompts)), max_model_len=engine.max_model_len,
                            prefix_caching=cached)
        cfg = dllm.GenerationConfig(block_size=b, max_new_tokens=cap, threshold=args.threshold)
        [again.generate(prompts[i:i + args.batch], cfg) for i in range(0, len(prompts), args.batch)]  # first sight
        gens, secs = timed(lambda: [g for i in range(0, len(prompts), args.batch)
                                    for g in again.generate(prompts[i:i + args.batch], cfg)])
        how = "prefix cache: prefill skipped" if cached else "prefix cache off"
        record(f"dllm-var engine (prompts seen before, {how})", [g.token_ids for g in gens],
               sum(g.num_forwards for g in gens), secs, len(gens))
        results[-1]["prefix_cache_hits"] = again.prefix_cache_hits
    for gen_len in args.vanilla_gen_lengths:
        out, secs = timed(lambda: [llada_generate(model, [p], gen_length=gen_len, steps=gen_len, block_length=gen_len)
                                   for p in prompts])
        record(f"LLaDA vanilla (gen {gen_len}, steps {gen_len})", [o.token_ids[0] for o in out],
               sum(o.num_forwards for o in out), secs, len(prompts))
    out, secs = timed(lambda: [fast_dllm_generate(model, [p], gen_length=cap, block_length=args.fast_block,
                                                  threshold=args.threshold, cache="dual") for p in prompts])
    record(f"Fast-dLLM style (dual cache, gen {cap})", [o.token_ids[0] for o in out], sum(o.num_forwards for o in out),
           secs, len(prompts))
    if args.kv_cache_tokens:
        pool_rows(model, prompts, args, record, results)
    base = next((r["tps"] for r in results if r["system"].startswith("LLaDA vanilla")), None)
    for r in results:
        r["speedup_vs_vanilla"] = r["tps"] / base if base else None
    return results


def pool_rows(model, prompts, args, record, results) -> None:
    """--kv-cache-tokens: the same pool as slots of max_model_len, then paged and reserved, then paged
    on demand, swapping or recomputing preempted requests (see the module doc)."""
    tokens, max_len = args.kv_cache_tokens, args.pool_max_model_len
    b = args.block_size
    cfg = dllm.GenerationConfig(block_size=b, max_new_tokens=args.max_new_tokens, threshold=args.threshold)
    if tokens < max_len:
        raise SystemExit(f"--kv-cache-tokens {tokens} holds no slot of --pool-max-model-len {max_len}")
    for how, batch, allocation, preemption in (
            (f"a slot of {max_len} positions per request", tokens // max_len, "reserve", "swap"),
            ("paged, prompt + max_new_tokens reserved", len(prompts), "reserve", "swap"),
            ("paged on demand", len(prompts), "on_demand", "swap"),
            ("paged on demand, preempted K/V recomputed", len(prompts), "on_demand", "recompute")):
        engine = dllm.Engine(model, max_batch_size=batch, max_model_len=max_len, kv_cache_tokens=tokens,
                             prefix_caching=False, page_allocation=allocation, preemption_mode=preemption)
        engine.generate(prompts[:1], cfg.replace(max_new_tokens=b))  # warm-up
        peak, gens = 0, []

        def decode():
            nonlocal peak
            for p in prompts:
                engine.add_request(p, cfg)
            while engine.has_unfinished():
                gens.extend(o.generation for o in engine.step() if o.finished)
                peak = max(peak, engine.stats()["running"])

        _, secs = timed(decode)
        record(f"dllm-var engine ({len(prompts)} requests at once, {tokens}-token K/V pool, {how})",
               [g.token_ids for g in gens], sum(g.num_forwards for g in gens), secs, len(gens))
        stats = engine.stats()
        results[-1].update(peak_running=peak, preemptions=stats["preemptions"], rebuilt_tokens=stats["rebuilt_tokens"],
                           swapped_bytes=stats["swapped_bytes"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (default: a random model)")
    p.add_argument("--prompts-jsonl", help="Alpaca-style jsonl whose instruction+input are the prompts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--fast-block", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--batch", type=int, default=1, help="engine concurrency (1 = one request at a time)")
    p.add_argument("--decoders", nargs="+", default=["threshold"], choices=list(dllm.engine.DECODERS))
    p.add_argument("--logprobs", type=int, help="also decode returning logprobs with this many alternatives")
    p.add_argument("--top-p", type=float, help="also decode sampled, without and with this top_p (and top_k 50)")
    p.add_argument("--penalties", action="store_true", help="also decode with presence/frequency/repetition penalties")
    p.add_argument("--samples", type=int, help="also decode this many samples per prompt together, with and "
                   "without shared prefills")
    p.add_argument("--prefix-caching", action="store_true", help="also decode the prompts a second time, with and "
                   "without the prefix cache")
    p.add_argument("--kv-cache-tokens", type=int, help="also decode every prompt at once in a K/V pool of this many "
                   "tokens: slots of --pool-max-model-len, then pages")
    p.add_argument("--pool-max-model-len", type=int, default=2048,
                   help="the max_model_len a slot without pages reserves (--kv-cache-tokens)")
    p.add_argument("--vanilla-gen-lengths", type=int, nargs="+", default=[128])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--nucleus-candidates", type=int, default=NUCLEUS_CANDIDATES,
                   help="tokens a top_p without top_k ranks first (Engine.nucleus_candidates)")
    p.add_argument("--head-scale", type=float, default=1.0,
                   help="multiply the random model's LM head by this (more peaked distributions, smaller nuclei)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    results = run(args)
    w = max(len(r["system"]) for r in results)
    print(f"\n{'system':{w}} {'tokens':>7} {'NFE':>6} {'TPF':>6} {'sec':>8} {'tok/s':>9} {'speedup':>8}")
    for r in results:
        sp = f"{r['speedup_vs_vanilla']:.2f}x" if r["speedup_vs_vanilla"] else "-"
        print(f"{r['system']:{w}} {r['tokens']:7d} {r['forwards']:6d} {r['tpf']:6.2f} {r['seconds']:8.2f} "
              f"{r['tps']:9.1f} {sp:>8}" + (f"  {r['peak_running']} at once, {r['preemptions']} preempted"
                                             if "peak_running" in r else ""))
    pooled = [r for r in results if "peak_running" in r]
    if pooled:
        slots, reserved, on_demand, recomputed = pooled
        print(f"same K/V memory: slots {slots['peak_running']} requests at once; paged and reserved "
              f"{reserved['peak_running']}, {reserved['tps'] / slots['tps']:.2f}x the tok/s; paged on demand "
              f"{on_demand['peak_running']}, {on_demand['tps'] / slots['tps']:.2f}x "
              f"({on_demand['preemptions']} preempted, {on_demand['swapped_bytes'] / 2**20:.1f} MiB swapped); "
              f"preempted K/V recomputed instead: "
              f"{recomputed['tps'] / on_demand['tps']:.2f}x swap's tok/s ({recomputed['preemptions']} preempted, "
              f"{recomputed['rebuilt_tokens']} positions rebuilt)")
    write_json(args.json, {"device": args.device, "dtype": args.dtype, "results": results})


if __name__ == "__main__":
    main()
