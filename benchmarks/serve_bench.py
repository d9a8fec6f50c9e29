"""Load generator for the OpenAI-compatible endpoint: closed loop at fixed concurrency and open loop at a
request rate, with continuous batching on and off (max_batch_size=1) measured in the same run.

    python -m benchmarks.serve_bench --model CKPT_DIR [--concurrency 1 8 32] [--rate 4] [--requests 64]

Starts a local Ray Serve app per setting (or use --url for a running server). Reports throughput
(output tokens/s, requests/s), time to first block (first SSE chunk), and latency p50/p99, then the
batching gain as a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx

from dllm.synthetic import make_samples


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url, json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            body = json.loads(line[6:])
            if first is None and body.get("choices") and body["choices"][0].get("text"):
                first = time.perf_counter() - t0
            if body.get("usage"):
                tokens = body["usage"]["completion_tokens"]
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttfb": first if first is not None else latency, "tokens": tokens}


async def closed_loop(url, model, prompts, concurrency, max_tokens) -> list[dict]:
    queue = list(prompts)
    out = []
    async with httpx.AsyncClient(timeout=600) as client:
        async def worker():
            while queue:
                out.append(await one_request(client, url, model, queue.pop(), max_tokens))
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
            "mean_tokens": statistics.mean(r["tokens"] for r in results)}


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
    p.add_argument("--json")
    args = p.parse_args(argv)
    prompts = [s["instruction"] for s in make_samples(args.requests, seed=7)]
    rows = []
    if args.url:
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
    print(f"\n{'setting':26} {'tok/s':>8} {'req/s':>7} {'TTFB p50':>9} {'p50 s':>7} {'p99 s':>7}")
    for r in rows:
        print(f"{r['setting']:26} {r['tokens_per_s']:8.1f} {r['requests_per_s']:7.2f} {r['ttfb_p50']:9.3f} "
              f"{r['latency_p50']:7.3f} {r['latency_p99']:7.3f}")
    by = {r["setting"]: r for r in rows}
    for c in args.concurrency:
        b, u = by.get(f"batched closed c={c}"), by.get(f"unbatched closed c={c}")
        if b and u:
            print(f"batching gain at concurrency {c}: {b['tokens_per_s'] / u['tokens_per_s']:.2f}x tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
