"""Load generator for the OpenAI-compatible endpoint: closed loop at fixed concurrency and open loop at a
request rate, with continuous batching on and off (max_batch_size=1) measured in the same run.

    python -m benchmarks.serve_bench --model CKPT_DIR [--concurrency 1 8 32] [--rate 4] [--requests 64]

Starts a local Ray Serve app per setting (or use --url for a running server). Reports throughput
(output tokens/s, requests/s), time to first block (first SSE chunk), and latency p50/p99, then the
batching gain as a ratio.

    python -m benchmarks.serve_bench --routing [--model CKPT_DIR] [--replicas 2] [--distinct 8] [--repeats 4]

compares the routing between replicas instead: `--distinct` prompts of `--prompt-len` token ids, each asked
`--repeats` times in one shuffled order, sent at `--concurrency` to `--replicas` replicas under Serve's
power-of-two-choices routing and then under prompt affinity (a fresh app each, so both start with empty prefix
caches). Reports the share of prompt tokens served from a prefix cache beside the speed, and the ratios.
Without --model a random model (`--d-model`, `--layers`, a character tokenizer) is saved to a temporary
directory. Requests are sent with ignore_eos, so every one decodes --max-tokens tokens and only the prefills differ.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx

from benchmarks.report import write_json
from benchmarks.stats import percentile
from dllm.synthetic import all_text, make_samples


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str | list[int],
                      max_tokens: int, **extra) -> dict:
    t0 = time.perf_counter()
    first = None
    tokens = prompt_tokens = cached = 0
    async with client.stream("POST", url, json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                "stream": True, "stream_options": {"include_usage": True}, **extra}) as r:
        if r.status_code != 200:  # the server's error body says what was wrong
            raise RuntimeError(f"HTTP {r.status_code} from {url}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            body = json.loads(line[6:])
            if first is None and body.get("choices") and body["choices"][0].get("text"):
                first = time.perf_counter() - t0
            if body.get("usage"):
                tokens, prompt_tokens = body["usage"]["completion_tokens"], body["usage"]["prompt_tokens"]
                cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttfb": first if first is not None else latency, "tokens": tokens,
            "prompt_tokens": prompt_tokens, "cached_tokens": cached}


async def closed_loop(url, model, prompts, concurrency, max_tokens, **extra) -> list[dict]:
    queue = list(prompts)
    out = []
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker():
            while queue:
                out.append(await one_request(client, url, model, queue.pop(), max_tokens, **extra))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def open_loop(url, model, prompts, rate, max_tokens) -> list[dict]:
    rng = random.Random(0)
    async with httpx.AsyncClient(timeout=600) as client:
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(one_request(client, url, model, p, max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))  # Poisson arrivals
        return await asyncio.gather(*tasks)


def summarize(name: str, results: list[dict], wall: float) -> dict:
    lat = [r["latency"] for r in results]
    return {"setting": name, "requests": len(results), "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "requests_per_s": len(results) / wall, "ttfb_p50": percentile([r["ttfb"] for r in results], 0.5),
            "latency_p50": percentile(lat, 0.5), "latency_p99": percentile(lat, 0.99),
            "mean_tokens": statistics.mean(r["tokens"] for r in results),
            "cached_prompt_share": sum(r["cached_tokens"] for r in results) / max(1, sum(r["prompt_tokens"]
                                                                                       for r in results))}


def run_against(url, model, args, prompts, label) -> list[dict]:
    rows = []
    for c in args.concurrency:
        t = time.perf_counter()
        res = asyncio.run(closed_loop(url, model, prompts[: args.requests], c, args.max_tokens))
        rows.append(summarize(f"{label} closed c={c}", res, time.perf_counter() - t))
    if args.rate:
        t = time.perf_counter()
        res = asyncio.run(open_loop(url, model, prompts[: args.requests], args.rate, args.max_tokens))
        rows.append(summarize(f"{label} open {args.rate}/s", res, time.perf_counter() - t))
    return rows


def random_checkpoint(args, where) -> str:
    """A random LLaDA-shaped model with a character tokenizer, saved as a checkpoint the app can serve."""
    import dllm

    tokenizer = dllm.train_tokenizer(all_text(make_samples(500, seed=0)), kind="char")
    heads = max(1, args.d_model // 64)
    config = dllm.tiny_config(len(tokenizer), **dllm.special_ids(tokenizer), d_model=args.d_model,
                              n_layers=args.layers, n_heads=heads, n_kv_heads=heads, mlp_hidden_size=3 * args.d_model,
                              max_sequence_length=args.prompt_len + args.max_tokens + 2 * args.block_size)
    dllm.save_pretrained(dllm.build_model(config, seed=0), tokenizer, where)
    return str(where)


def repeated_prompts(model_dir: str, args) -> list[list[int]]:
    """--distinct prompts of --prompt-len ordinary token ids, each --repeats times, in one seeded shuffled order."""
    import dllm

    tokenizer = dllm.load_tokenizer(model_dir)
    special = {i for i in dllm.special_ids(tokenizer).values() if i is not None} | set(tokenizer.all_special_ids)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(0)
    distinct = [[rng.choice(ordinary) for _ in range(args.prompt_len)] for _ in range(args.distinct)]
    order = distinct * args.repeats
    rng.shuffle(order)
    return order


def compare_routing(args) -> list[dict]:
    """The same repeated-prompt load under each routing, on --replicas fresh replicas each time."""
    import tempfile

    from ray import serve

    from serve.app import build_app

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or random_checkpoint(args, f"{tmp}/random")
        prompts = repeated_prompts(model_dir, args)
        concurrency = args.concurrency[0]
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        url = f"http://127.0.0.1:{args.port}/v1/completions"
        rows = []
        for routing in ("power_of_two", "prompt_affinity"):
            serve.run(build_app({"model": model_dir, "name": args.name, "routing": routing,
                                 "num_replicas": args.replicas, "num_cpus": 0.5, "max_batch_size": args.max_batch_size,
                                 "max_queued_requests": 10 * len(prompts), "max_model_len": args.prompt_len
                                 + args.max_tokens + 2 * args.block_size,
                                 "decoding": {"block_size": args.block_size, "max_tokens": args.max_tokens}}),
                      name="bench", route_prefix="/")
            t = time.perf_counter()
            # ignore_eos: every request decodes max_tokens, so the routings differ only in their prefills
            res = asyncio.run(closed_loop(url, args.name, prompts, concurrency, args.max_tokens, ignore_eos=True))
            rows.append({**summarize(f"{routing} c={concurrency}", res, time.perf_counter() - t),
                         "replicas": args.replicas, "max_batch_size": args.max_batch_size, "distinct": args.distinct,
                         "repeats": args.repeats, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
                         "model": args.model or f"random d_model={args.d_model} layers={args.layers}"})
            serve.delete("bench")
        serve.shutdown()
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory to serve locally")
    p.add_argument("--url", help="an already running server's base URL (skips the local deployments)")
    p.add_argument("--name", default="bench")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rate", type=float, default=4.0, help="open-loop requests per second (0: skip)")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--port", type=int, default=8451)
    p.add_argument("--routing", action="store_true",
                   help="compare prompt-affinity routing with power-of-two choices on repeated prompts")
    p.add_argument("--replicas", type=int, default=2, help="--routing: engine replicas")
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="--routing: requests per replica's batch (also its cache slots, which hold the prefix cache)")
    p.add_argument("--distinct", type=int, default=8, help="--routing: distinct prompts")
    p.add_argument("--repeats", type=int, default=4, help="--routing: times each prompt is asked")
    p.add_argument("--prompt-len", type=int, default=512, help="--routing: tokens per prompt")
    p.add_argument("--d-model", type=int, default=256, help="--routing without --model: the random model's width")
    p.add_argument("--layers", type=int, default=4, help="--routing without --model: the random model's depth")
    p.add_argument("--json")
    args = p.parse_args(argv)
    prompts = [s["instruction"] for s in make_samples(args.requests, seed=7)]
    rows = []
    if args.routing:
        if args.url:
            p.error("--routing starts its own apps (one per routing); it cannot use --url")
        from pipelines.runtime import ensure_ray

        ensure_ray()
        rows = compare_routing(args)
    elif args.url:
        rows += run_against(f"{args.url}/v1/completions", args.name, args, prompts, "server")
    else:
        if not args.model:
            p.error("give --model (served locally) or --url")
        from pipelines.runtime import ensure_ray

        ensure_ray()
        from ray import serve

        from serve.app import build_app

        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        url = f"http://127.0.0.1:{args.port}/v1/completions"
        for label, batch in (("batched", max(args.concurrency)), ("unbatched", 1)):
            serve.run(build_app({"model": args.model, "name": args.name, "max_batch_size": batch,
                                 "max_queued_requests": 10 * args.requests,
                                 "decoding": {"block_size": args.block_size, "max_tokens": args.max_tokens}}),
                      name="bench", route_prefix="/")
            rows += run_against(url, args.name, args, prompts, label)
        serve.shutdown()
    print(f"\n{'setting':26} {'tok/s':>8} {'req/s':>7} {'TTFB p50':>9} {'p50 s':>7} {'p99 s':>7} {'cached':>7}")
    for r in rows:
        print(f"{r['setting']:26} {r['tokens_per_s']:8.1f} {r['requests_per_s']:7.2f} {r['ttfb_p50']:9.3f} "
              f"{r['latency_p50']:7.3f} {r['latency_p99']:7.3f} {r['cached_prompt_share']:7.1%}")
    if args.routing:
        base, affinity = rows
        print(f"prompt affinity over power of two: {affinity['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, "
              f"p50 latency {affinity['latency_p50'] / base['latency_p50']:.2f}x, cached prompt tokens "
              f"{base['cached_prompt_share']:.1%} -> {affinity['cached_prompt_share']:.1%} "
              f"(at most {(args.repeats - 1) / args.repeats:.1%}: each prompt's first request prefills)")
    by = {r["setting"]: r for r in rows}
    for c in args.concurrency:
        b, u = by.get(f"batched closed c={c}"), by.get(f"unbatched closed c={c}")
        if b and u:
            print(f"batching gain at concurrency {c}: {b['tokens_per_s'] / u['tokens_per_s']:.2f}x tokens/s")
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
