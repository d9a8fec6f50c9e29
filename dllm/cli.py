"""The `dllm` command: one entry point for every stage.

    dllm quickstart            the whole pipeline on an embedded local Ray (synthetic data -> serve)
    dllm data synthetic        write the synthetic variable-length task as Alpaca jsonl
    dllm pack ...              Ray Data tokenise + pack (same as python -m pipelines.pack)
    dllm train ...             Ray Train + DeepSpeed SFT (same as python -m train.sft)
    dllm serve --model DIR     Ray Serve OpenAI-compatible server
    dllm batch ...             answer a dataset with engine replicas on Ray Data (python -m pipelines.generate)
    dllm generate --model DIR  decode prompts with the engine, no Ray (--stream: print answers as they settle)
    dllm score --model DIR     rank continuations of a prompt by log-likelihood (ELBO), no Ray

The Ray-based stages are imported only when their subcommand runs: the `dllm` core itself never
imports Ray.
"""

from __future__ import annotations

import argparse
import json
import sys

from .checkpoint import INFERENCE_DTYPES
from .engine.config import CACHE_POLICIES, DECODERS
from .engine.scheduler import PAGE_ALLOCATIONS, PREEMPTION_MODES, SCHEDULING_POLICIES
from .quantization import QUANTIZATIONS
from .tool_calls import TOOL_CALL_FORMATS


def _generate(args) -> int:
    import dllm

    model, tok = _load(args)
    engine = dllm.Engine(model, tok, max_batch_size=max(1, len(args.prompt)), quantization=args.quantization)
    config = dllm.GenerationConfig(block_size=args.block_size, threshold=args.threshold,
                                   max_new_tokens=args.max_new_tokens, decoder=args.decoder,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   min_p=args.min_p, presence_penalty=args.presence_penalty,
                                   frequency_penalty=args.frequency_penalty,
                                   repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                                   early_stop=args.early_stop, stream_settled=args.stream,
                                   **_response_format(args))
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               if args.chat else p for p in args.prompt]
    if args.stream:
        _print_streamed(engine, prompts, config, args.prompt)
        return 0
    for prompt, gen in zip(args.prompt, engine.generate(prompts, config)):
        print(f"> {prompt}\n{gen.text}\n{_summary(gen)}")
    return 0


def _response_format(args) -> dict:
    """GenerationConfig's response_format and json_schema from --json / --json-schema FILE."""
    if args.json_schema:
        with open(args.json_schema) as f:
            try:
                schema = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"--json-schema {args.json_schema} is not JSON: {e}") from e
        return {"response_format": "json_schema", "json_schema": schema}
    return {"response_format": "json_object" if args.json else None}


def _summary(gen) -> str:
    return f"[{gen.finish_reason}, {len(gen.token_ids)} tokens, {gen.num_forwards} forwards, TPF {gen.tokens_per_forward:.2f}]"


def _print_streamed(engine, prompts: list[str], config, shown: list[str]) -> None:
    """Decode one prompt after the other, printing each answer's text as it settles (--stream)."""
    for prompt, label in zip(prompts, shown):
        print(f"> {label}", flush=True)
        engine.add_request(prompt, config)
        while engine.has_unfinished():
            for out in engine.step():
                print(out.new_text, end="", flush=True)
                if out.finished:
                    print(f"\n{_summary(out.generation)}", flush=True)


def _load(args):
    import dllm

    device, dtype = dllm.inference_placement(args.device)
    return dllm.load_model(args.model, device=device, dtype=dtype), dllm.load_tokenizer(args.model)


def _score(args) -> int:
    import dllm

    model, tok = _load(args)
    prompt = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                     add_generation_prompt=True) if args.chat else args.prompt
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    results = [dllm.log_likelihood(model, prompt_ids, tok(c, add_special_tokens=False)["input_ids"],
                                   mc_samples=args.mc_samples, seed=args.seed) for c in args.continuation]
    best = max(range(len(results)), key=lambda i: results[i].value)
    for i, (cont, r) in enumerate(zip(args.continuation, results)):
        print(f"{'*' if i == best else ' '} {r.value:10.3f} +- {r.std_error:.3f}  ({r.tokens} tokens)  {cont!r}")
    return 0


SERVE_DECODING_FLAGS = ("decoder", "block_size", "threshold", "max_tokens", "cache_policy")


def serve_app_args(args) -> dict:
    """`dllm serve` flags -> serve.app:build_app keys (only those given: build_app has the defaults). vLLM's names
    of the same flags are taken too (--served-model-name, --max-num-seqs, --api-key, ...)."""
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (the format the model writes its calls "
                         f"in: one of {list(TOOL_CALL_FORMATS)})")
    if args.tensor_parallel_size not in (None, 1):
        raise ValueError(f"--tensor-parallel-size {args.tensor_parallel_size}: tensor_parallel_size > 1 is not "
                         "supported (a replica holds the whole model on one GPU); scale out with --num-replicas or "
                         "--max-replicas")
    app_args = {"model": args.model, "max_batch_size": args.max_batch_size, "prefix_caching": args.prefix_caching,
                "routing": args.routing}
    for key in ("name", "max_model_len", "kv_cache_tokens", "gpu_memory_utilization", "max_block_size",
                "max_prefill_tokens", "page_allocation", "preemption_mode", "scheduling_policy", "swap_space",
                "quantization", "num_gpus", "min_replicas", "max_replicas", "num_replicas", "api_keys"):
        value = getattr(args, key)
        if value is not None:
            app_args[key] = value
    for key in ("dtype", "chat_template", "tool_call_parser"):
        if getattr(args, key) is not None:
            app_args[key] = getattr(args, key)
    # the replicas' decoding defaults (DEFAULT_DECODING's keys), for requests that name none
    decoding = {key: getattr(args, key) for key in SERVE_DECODING_FLAGS if getattr(args, key) is not None}
    if decoding:
        app_args["decoding"] = decoding
    return app_args


def _serve(args) -> int:
    import time

    from pipelines.runtime import dashboard_url, ensure_ray

    app_args = serve_app_args(args)  # a bad flag stops here, before Ray starts
    ensure_ray(args.address)
    from ray import serve

    from serve.app import build_app

    app = build_app(app_args)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="dllm", route_prefix="/")
    print(f"serving {args.model} at http://{args.host}:{args.port}/v1 (OpenAI-compatible); "
          f"dashboard: {dashboard_url() or 'off'}; Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    from .quickstart import add_quickstart_parser
    from .synthetic import add_synthetic_parser

    add_quickstart_parser(sub)
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    add_synthetic_parser(data)

    pack = sub.add_parser("pack", help="Ray Data tokenise + pack (python -m pipelines.pack)", add_help=False)
    pack.set_defaults(func=lambda a, rest: __import__("pipelines.pack", fromlist=["main"]).main(rest))
    batch = sub.add_parser("batch", help="answer a dataset with engine replicas on Ray Data (python -m pipelines.generate)",
                           add_help=False)
    batch.set_defaults(func=lambda a, rest: __import__("pipelines.generate", fromlist=["main"]).main(rest))
    train = sub.add_parser("train", help="Ray Train + DeepSpeed SFT (python -m train.sft)", add_help=False)
    train.set_defaults(func=lambda a, rest: __import__("train.sft", fromlist=["main"]).main(rest))

    s = sub.add_parser("serve", help="serve a checkpoint with Ray Serve (OpenAI-compatible HTTP)")
    s.add_argument("--model", required=True, help="checkpoint directory")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", "--served-model-name", dest="name",
                   help="model name clients send (default: the directory name)")
    s.add_argument("--max-batch-size", "--max-num-seqs", dest="max_batch_size", type=int, default=16,
                   help="requests decoded together per replica")
    s.add_argument("--max-model-len", type=int, help="cache positions per request (default: the model's)")
    s.add_argument("--kv-cache-tokens", type=int,
                   help="paged K/V pool size per replica, in tokens (default: max batch size x max model len); a "
                        "request takes pages as its answer grows")
    s.add_argument("--gpu-memory-utilization", type=float,
                   help="size the K/V pool from GPU memory instead: the share of the GPU's memory in use once the "
                        "pool is allocated, after the weights and the measured peak of a full batch (0-1; CUDA only; "
                        "not with --kv-cache-tokens)")
    s.add_argument("--max-block-size", type=int,
                   help="refuse requests with larger blocks (default: none; with --gpu-memory-utilization, the "
                        "decoding block size its memory probe runs at)")
    s.add_argument("--max-prefill-tokens", type=int,
                   help="padded prompt tokens one prefill forward may hold (default 8192; a longer prompt runs "
                        "alone); lower it where a full prefill does not fit beside the K/V pool")
    s.add_argument("--page-allocation", choices=PAGE_ALLOCATIONS,
                   help="on_demand (default): pages as answers grow, the newest request preempted when the pool runs "
                        "out (see --preemption-mode); reserve: each request's prompt + max_tokens at admission, never "
                        "preempted")
    s.add_argument("--preemption-mode", choices=PREEMPTION_MODES,
                   help="how a preempted request gets its K/V back: swap (default): through host memory, bit for bit; "
                        "recompute: forwards of its tokens write them again (no host memory, a forward per block)")
    s.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES,
                   help="fcfs (default): requests run in arrival order; priority (vLLM's): by each request's "
                        "'priority' (lower first, then arrival), an urgent request preempting less urgent ones")
    s.add_argument("--swap-space", type=float,
                   help="GiB of host memory swapped K/V may take per replica (default 4); beyond it preempted requests "
                        "are recomputed")
    s.add_argument("--quantization", choices=QUANTIZATIONS,
                   help="fp8: the block projections' weights in FP8 E4M3 (per-channel scales, inputs quantised per "
                        "token), half the bytes a bf16 decode step reads for them; the checkpoint stays as it is "
                        "(GPUs of compute capability >= 8.9, or CPU)")
    s.add_argument("--dtype", choices=INFERENCE_DTYPES,
                   help="the weights' dtype on the replicas (default: bfloat16 on a GPU, float32 on a CPU)")
    s.add_argument("--chat-template",
                   help="a Jinja chat template, or a file holding one, in place of the checkpoint's (read here; it "
                        "travels with the app to every replica)")
    s.add_argument("--tool-call-parser", choices=TOOL_CALL_FORMATS,
                   help="hermes: tool_choice 'auto' (the default where a request gives tools) answers freely and the "
                        "calls the model writes as <tool_call> JSON blocks become the answer's tool_calls (vLLM's "
                        "--tool-call-parser; for a model trained to write them). Without it 'auto' is a 400")
    s.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="vLLM's flag for tool_choice 'auto', taken as it is: here --tool-call-parser turns 'auto' on, "
                        "and this flag needs one")
    s.add_argument("--tensor-parallel-size", "-tp", type=int,
                   help="vLLM's; only 1: a replica holds the whole model on one GPU (scale out with replicas)")
    decoding = s.add_argument_group("decoding defaults", "for requests that do not choose (each is also a request "
                                    "field); defaults: decoder threshold, block size 64, threshold 0.9, 256 tokens")
    decoding.add_argument("--decoder", choices=DECODERS)
    decoding.add_argument("--block-size", type=int, help="positions decoded together (the CUDA graphs' shape)")
    decoding.add_argument("--threshold", type=float, help="confidence at which a position commits")
    decoding.add_argument("--max-tokens", type=int, help="answer length when a request gives no max_tokens")
    decoding.add_argument("--cache-policy", choices=CACHE_POLICIES)
    s.add_argument("--num-gpus", type=float, help="GPUs per replica (default 1 if the cluster has GPUs, else 0)")
    s.add_argument("--num-replicas", type=int)
    s.add_argument("--min-replicas", type=int, help="autoscaling lower bound")
    s.add_argument("--max-replicas", type=int, help="autoscaling upper bound")
    s.add_argument("--api-keys", "--api-key", dest="api_keys",
                   help="comma-separated keys required as 'Authorization: Bearer <key>'")
    s.add_argument("--no-prefix-caching", "--no-enable-prefix-caching", dest="prefix_caching", action="store_false",
                   help="prefill every request, even one whose prompt's K/V the cache still holds")
    s.add_argument("--routing", choices=("prompt_affinity", "power_of_two"), default="prompt_affinity",
                   help="how requests pick a replica: the requests of one prompt meet on one replica (its prefix "
                        "cache and shared prefills) unless it is overloaded, or Serve's two-random-choices default")
    s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    s.set_defaults(func=lambda a, rest: _serve(a))

    g = sub.add_parser("generate", help="decode prompts with the engine (no Ray)")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", action="append", required=True, help="repeat for several prompts (decoded together)")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.add_argument("--quantization", choices=QUANTIZATIONS, help="fp8: FP8 weights for the block projections")
    g.add_argument("--block-size", type=int, default=64)
    g.add_argument("--threshold", type=float, default=0.9)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--decoder", default="threshold", choices=DECODERS)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples from softmax(logits / T)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample within the nucleus holding this probability")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="sample tokens at least this fraction as likely as the most likely one")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="in [-2, 2]: taken off the logit of every token the answer already holds")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="in [-2, 2]: taken off a token's logit once per occurrence in the answer so far")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 0 (1 = off): divides the logits of tokens in the prompt or the answer (vLLM's)")
    g.add_argument("--seed", type=int, help="the same seed gives the same samples")
    g.add_argument("--stop", action="append", help="a stop string (repeat for several)")
    g.add_argument("--stream", action="store_true",
                   help="print each answer as it settles (the block's leftmost decided positions), one prompt at a "
                        "time")
    g.add_argument("--json", action="store_true",
                   help="JSON mode: each answer is one JSON object (decoded from the left, checked token by token)")
    g.add_argument("--json-schema", metavar="FILE",
                   help="JSON mode held to the JSON Schema in FILE (see dllm.engine.json_schema for its keywords)")
    g.add_argument("--early-stop", action=argparse.BooleanOptionalAction, default=True,
                   help="end a block at a settled stop token: same text, fewer forwards (as the server)")
    g.add_argument("--device")
    g.set_defaults(func=lambda a, rest: _generate(a))

    sc = sub.add_parser("score", help="rank continuations of a prompt by their log-likelihood (ELBO; no Ray)")
    sc.add_argument("--model", required=True)
    sc.add_argument("--prompt", required=True)
    sc.add_argument("--continuation", action="append", required=True, help="repeat for each answer to score")
    sc.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    sc.add_argument("--mc-samples", type=int, default=64, help="masked draws per continuation (more: less noise)")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--device")
    sc.set_defaults(func=lambda a, rest: _score(a))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("pack", "batch", "train"):  # their own parsers read the rest
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args, rest) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
