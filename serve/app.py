"""The Ray Serve application: engine replicas behind an OpenAI-compatible FastAPI ingress.

    serve run serve.app:build_app model=/path/to/checkpoint
    serve run cluster/serve-config.yaml
    dllm serve --model /path/to/checkpoint

`EngineServer` replicas each load the checkpoint and run the continuous-batching engine in a
background thread: requests from every caller join its batch between steps. `OpenAIIngress`
validates and tokenises requests, then streams each committed block back (SSE) or returns the
whole answer. The ingress routes the requests of one prompt to one replica (`router.py`), where they
share a prefill or find the prompt's K/V in the prefix cache. Tensor parallelism is not supported: a
replica holds the whole model on one GPU (LLaDA-8B in bf16 takes ~16 GB); scale with replicas.
"""


import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jinja2
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

import dllm
from dllm.checkpoint import INFERENCE_DTYPES
from dllm.engine.async_loop import EngineLoop
from dllm.quantization import QUANTIZATIONS

from .protocol import (DEFAULT_MC_SAMPLES, MAX_CHOICES, APIError, ChatCompletionRequest, CompletionRequest,
                       DetokenizeRequest, DiffusionOptions, LoglikelihoodRequest, StreamOptions, TokenizeRequest,
                       chat_conversation, chat_logprobs, completion_logprobs, fold_structured_outputs, logit_bias_ids,
                       logprobs_wanted, message_text, new_id, now, reject_unsupported, usage)
from .tools import TOOL_CALL_PARSERS, ChatDeltas, ForcedCall, ParsedCalls, chat_message, tool_functions, tool_use
from .router import PromptAffinityRouter

# The server stops a block at a settled EOS (same answers, fewer forwards) and commits EOS only after
# the content left of it (answers are not cut short); see GenerationConfig.
DEFAULT_DECODING = {"block_size": 64, "threshold": 0.9, "decoder": "threshold", "max_tokens": 256, "early_stop": True,
                    "stops_last": True, "cache_policy": "dllm-var"}


def _decoding_defaults(user_config: dict | None) -> dict:
    cfg = {**DEFAULT_DECODING, **(user_config or {})}
    unknown = set(cfg) - set(DEFAULT_DECODING) - {"commit_pass"}
    if unknown:
        raise ValueError(f"user_config: unknown key(s) {sorted(unknown)}; allowed: {sorted(DEFAULT_DECODING)} + commit_pass")
    _generation_config(cfg)  # validates the values
    return cfg


def _generation_config(decoding: dict, max_new_tokens: int | None = None, **request) -> dllm.GenerationConfig:
    """The engine's config from decoding options (DEFAULT_DECODING's keys, optionally commit_pass) and
    a request's own fields (temperature, seed, stop); `max_new_tokens` falls back to max_tokens."""
    return dllm.GenerationConfig(
        block_size=decoding["block_size"], threshold=decoding["threshold"], decoder=decoding["decoder"],
        max_new_tokens=max_new_tokens or decoding["max_tokens"], early_stop=decoding["early_stop"],
        stops_last=decoding["stops_last"], cache_policy=decoding["cache_policy"],
        commit_pass=decoding.get("commit_pass", True), **request)


class EngineServer:
    """One model replica: the engine, its background loop, health and metrics."""

    def __init__(self, model: str, max_batch_size: int = 16, max_model_len: int | None = None,
                 dtype: str | None = None, prefix_caching: bool = True, kv_cache_tokens: int | None = None,
                 page_allocation: str = "on_demand", preemption_mode: str = "swap", swap_space: float = 4.0,
                 gpu_memory_utilization: float | None = None, max_block_size: int | None = None,
                 quantization: str | None = None, scheduling_policy: str = "fcfs",
                 max_prefill_tokens: int | None = None) -> None:
        device, default_dtype = dllm.inference_placement()
        torch_dtype = getattr(torch, dtype) if dtype else default_dtype
        self.model_dir = model
        net = dllm.load_model(model, device=device, dtype=torch_dtype)
        tokenizer = dllm.load_tokenizer(model)
        self.engine = dllm.Engine(net, tokenizer, max_batch_size=max_batch_size, max_model_len=max_model_len,
                                  prefix_caching=prefix_caching, kv_cache_tokens=kv_cache_tokens,
                                  page_allocation=page_allocation, preemption_mode=preemption_mode,
                                  swap_space=swap_space, gpu_memory_utilization=gpu_memory_utilization,
                                  max_block_size=max_block_size, quantization=quantization,
                                  scheduling_policy=scheduling_policy,
                                  **({"max_prefill_tokens": max_prefill_tokens} if max_prefill_tokens else {}))
        if self.engine.memory_plan is not None:
            logging.getLogger("ray.serve").info("gpu_memory_utilization: %s", self.engine.memory_plan)
        self.defaults = dict(DEFAULT_DECODING)  # build_app's user_config replaces them through reconfigure
        self.loop = EngineLoop(self.engine)
        self._metrics = _EngineMetrics()
        self.loop.on_step = self._metrics.on_step

    async def reconfigure(self, user_config: dict) -> None:
        """Change decoding defaults (block size, threshold, decoder, max_tokens) without a restart. Serve calls
        it after __init__ too (build_app always sets a user_config). On CUDA the graphs of every batch bucket
        for the default block size (and the default decoder's decode steps) are captured here, on the engine
        thread between steps, so that neither the first requests nor those after a change of block size pay
        for captures."""
        defaults = _decoding_defaults(user_config)
        top = self.engine.max_block_size
        if top is not None and defaults["block_size"] > top:
            raise ValueError(f"user_config: block_size {defaults['block_size']} is larger than this replica's "
                             f"max_block_size {top}")
        self.defaults = defaults
        await self.loop.call(lambda: self.engine.warmup([defaults["block_size"]], [defaults["decoder"]]))

    def check_health(self) -> None:
        if not self.loop.alive:
            raise RuntimeError(f"engine loop is dead: {self.loop.error!r}")

    def info(self) -> dict:
        return {"defaults": self.defaults, "max_model_len": self.engine.max_model_len, "aborted": self.loop.aborted,
                "quantization": self.engine.quantization,
                "scheduling_policy": self.engine.scheduling_policy,
                "max_prefill_tokens": self.engine.scheduler.max_prefill_tokens,
                "pid": os.getpid(), **self.engine.stats(),
                "memory_plan": self.engine.memory_plan.as_dict() if self.engine.memory_plan is not None else None}

    async def generate(self, payload: dict):
        """Stream one request: a dict per committed block, the last with finish_reason and stats.
        payload: prompt_ids, max_tokens, options (DiffusionOptions, over this replica's defaults),
        sampling (the request's other GenerationConfig fields) and priority."""
        opts = {k: v for k, v in payload.get("options", {}).items() if v is not None}
        merged = {**self.defaults, **opts}
        if payload.get("sampling", {}).get("response_format") and "decoder" not in opts:
            merged["decoder"] = "threshold"  # JSON mode's rule, whatever this replica's default decoder
        config = _generation_config(merged, payload.get("max_tokens"), **payload.get("sampling", {}))
        start = time.monotonic()
        first = True
        async for out in self.loop.generate(payload["prompt_ids"], config, payload.get("priority", 0)):
            if first:
                self._metrics.first_block.observe(time.monotonic() - start)
                first = False
            item = {"token_ids": out.new_token_ids, "text": out.new_text, "finished": out.finished,
                    "logprobs": out.new_logprobs}  # TokenLogprobs of token_ids, or None
            if out.finished:
                g = out.generation
                item.update(finish_reason=g.finish_reason, num_forwards=g.num_forwards, num_blocks=g.num_blocks,
                            completion_tokens=len(g.token_ids), prompt_tokens=g.prompt_tokens,
                            cached_prompt_tokens=g.cached_prompt_tokens)
                self._metrics.on_finish(g)
            yield item

    async def loglikelihood(self, payload: dict) -> dict:
        """ELBO estimate of log p(continuation | prompt), run on the engine thread between steps."""
        net = self.engine.model

        def score():
            return dllm.log_likelihood(net, payload["prompt_ids"], payload["continuation_ids"],
                                       mc_samples=payload["mc_samples"], seed=payload["seed"])

        result = await self.loop.call(score)
        return {"loglikelihood": result.value, "std_error": result.std_error, "tokens": result.tokens,
                "forwards": result.forwards}

    def __del__(self) -> None:  # graceful drain: Serve stops routing first, then in-flight requests finish
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.shutdown(timeout=20)


class _EngineMetrics:
    """Custom metrics (Ray dashboard / Prometheus: names get a `ray_` prefix, counters `_total`)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter("dllm_requests", "finished requests", tag_keys=("finish_reason",))
        self.tokens = Counter("dllm_generated_tokens", "tokens generated (before the first EOS)")
        self.forwards = Counter("dllm_forwards", "model forwards spent on finished requests")
        self.cached = Counter("dllm_cached_prompt_tokens", "prompt tokens whose K/V came from the prefix cache")
        self.tpf = Histogram("dllm_tokens_per_forward", "tokens per forward of a finished request",
                             boundaries=[1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32])
        self.first_block = Histogram("dllm_time_to_first_block_s", "seconds from arrival to the first committed block",
                                     boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30])
        self.queue = Gauge("dllm_queue_depth", "requests waiting for KV-cache room (a slot and their pages)")
        self.running = Gauge("dllm_running_requests", "requests being decoded")
        self.cache = Gauge("dllm_kv_cache_usage", "fraction of KV-cache pages held by running requests")
        self.tps = Gauge("dllm_engine_tokens_per_s", "tokens per second over the last finished requests")
        self.swapped = Gauge("dllm_swapped_kv_bytes", "K/V bytes of preempted requests in host memory (at most "
                             "swap_space, but for requests without the commit pass)")
        # Engine totals (Engine.stats() keys) exported as counters of their increments.
        self.totals = {
            "preemptions": Counter("dllm_preemptions", "running requests that gave their KV-cache pages back "
                                   "(swapped out to host memory or dropped to be rebuilt)"),
            "rebuilt_tokens": Counter("dllm_rebuilt_kv_tokens", "committed K/V positions written again for "
                                      "preempted requests that dropped them"),
        }
        self._counted = dict.fromkeys(self.totals, 0)
        self._window: list[tuple[float, int]] = []

    def on_step(self, stats: dict) -> None:
        for key, counter in self.totals.items():
            if stats[key] > self._counted[key]:  # Ray counters only accept positive increments
                counter.inc(stats[key] - self._counted[key])
                self._counted[key] = stats[key]
        self.swapped.set(stats["swapped_bytes_now"])
        self.queue.set(stats["waiting"])
        self.running.set(stats["running"])
        self.cache.set(stats["cache_pages_used"] / max(1, stats["cache_pages_total"]))

    def on_finish(self, g: dllm.Generation) -> None:
        self.requests.inc(tags={"finish_reason": g.finish_reason})
        if g.token_ids:  # Ray counters only accept positive increments
            self.tokens.inc(len(g.token_ids))
        if g.num_forwards:
            self.forwards.inc(g.num_forwards)
        if g.cached_prompt_tokens:
            self.cached.inc(g.cached_prompt_tokens)
        self.tpf.observe(g.tokens_per_forward)
        t = time.monotonic()
        self._window = [(ts, n) for ts, n in self._window if t - ts < 30] + [(t, len(g.token_ids))]
        span = max(1e-3, t - self._window[0][0]) if len(self._window) > 1 else 30.0
        self.tps.set(sum(n for _, n in self._window) / span)


# ----- the HTTP ingress ------------------------------------------------------------------------

api = FastAPI(title="dllm OpenAI-compatible API")


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(status_code=e.status, content=e.body())


@api.exception_handler(APIError)
async def _api_error(_: Request, e: APIError):
    return _error_response(e)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError):
    err = e.errors()[0] if e.errors() else {}
    loc = [str(x) for x in err.get("loc", []) if x != "body"]
    if err.get("type") == "json_invalid":
        return _error_response(APIError(400, "the request body is not valid JSON", code="invalid_json"))
    param = loc[0] if loc else None  # the request field, as OpenAI names it
    where = ".".join(loc)
    msg = f"invalid value for '{where}': {err.get('msg', 'invalid')}" if param else err.get("msg", "invalid request")
    return _error_response(APIError(400, msg, param=param, code="invalid_value"))


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException):
    return _error_response(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))


def _load_api_keys(api_keys: list[str] | None) -> set[str]:
    keys = set(api_keys or [])
    if os.environ.get("DLLM_API_KEYS"):
        keys |= {k.strip() for k in os.environ["DLLM_API_KEYS"].split(",") if k.strip()}
    if os.environ.get("DLLM_API_KEYS_FILE"):
        with open(os.environ["DLLM_API_KEYS_FILE"]) as f:
            keys |= {line.strip() for line in f if line.strip()}
    return keys


_KEYS_ENV = "DLLM_INGRESS_ACTIVE_KEYS"  # set by the ingress replica at start-up
_OPEN_PATHS = ("/health", "/-/healthz")


@api.middleware("http")
async def _require_api_key(request: Request, call_next):
    keys = os.environ.get(_KEYS_ENV, "")
    if keys and not request.url.path.endswith(_OPEN_PATHS):
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer ") or header[7:] not in keys.split("\n"):
            return _error_response(APIError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                            type="authentication_error", code="invalid_api_key"))
    return await call_next(request)


async def _merged(streams: list):
    """(index, item) from several engine streams as items arrive. Closing it early (a client that
    hung up, an error) cancels the streams still running, which aborts their requests."""
    inbox: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream) -> None:
        try:
            async for item in stream:
                inbox.put_nowait((index, item))
            inbox.put_nowait((index, done))
        except Exception as e:
            inbox.put_nowait((index, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await inbox.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task, stream in zip(tasks, streams):
            if not task.done():
                task.cancel()
                stream.cancel()


async def _indexed(items: list[dict]):
    """(index, item) of items known already, in the shape _merged yields engine items."""
    for index, item in enumerate(items):
        yield index, item


@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, engine, model: str, served_model_name: str | None = None, max_model_len: int | None = None,
                 max_tokens_cap: int = 1024, api_keys: list[str] | None = None,
                 default_block_size: int = DEFAULT_DECODING["block_size"], max_block_size: int | None = None,
                 chat_template: str | None = None, scheduling_policy: str = "fcfs",
                 tool_call_parser: str | None = None) -> None:
        self.engine = engine
        self.tool_call_parser = tool_call_parser  # the format calls are parsed from under tool_choice "auto"
        self.scheduling_policy = scheduling_policy  # a priority on a first-come-first-served app: a 400 here
        self.max_block_size = max_block_size  # the replicas refuse larger blocks: a 400 before any stream starts
        # The replicas' block size when a request names none (the app's decoding defaults; a change to them
        # redeploys this ingress with the new value), so the context check matches what they will decode.
        self.default_block_size = default_block_size
        self.tokenizer = dllm.load_tokenizer(model)
        if chat_template is not None:  # the operator's, in place of the checkpoint's
            self.tokenizer.chat_template = chat_template
        config = dllm.LLaDAConfig.from_file(os.path.join(model, "config.json"))
        self.mask_token_id = config.mask_token_id  # never generated: an allowed_token_ids holding it is a 400
        self.max_model_len = max_model_len or config.max_sequence_length
        self.max_tokens_cap = max_tokens_cap
        self.model_name = served_model_name or os.path.basename(os.path.normpath(model))
        self.api_keys = _load_api_keys(api_keys)
        self.created = now()

        # Serve ships the FastAPI app (and this middleware) by value, so module globals would be a
        # different copy from the one the middleware sees; the process environment is shared.
        os.environ[_KEYS_ENV] = "\n".join(sorted(self.api_keys))

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "dllm", "max_model_len": self.max_model_len}]}

    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest):
        _, response_format = self._check_common(req)
        prompts = req.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        elif not prompts:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        prompt_ids = [self._ids(p, "prompt") for p in prompts]
        kept = [self._truncated(req, ids) for ids in prompt_ids]
        # the echo is the prompt the model read: the client's string, unless truncate_prompt_tokens cut it
        echo = [p if isinstance(p, str) and len(k) == len(ids) else self.tokenizer.decode(k)
                for p, ids, k in zip(prompts, prompt_ids, kept)] if req.echo else None
        prompt_ids = kept
        return await self._run(req, prompt_ids, response_format, chat=False, echo=echo)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest):
        if req.max_completion_tokens is not None and req.max_tokens is None:
            req.max_tokens = req.max_completion_tokens
        tools, response_format = self._check_common(req)
        ids = self._chat_ids(req.messages, req.add_generation_prompt, req.continue_final_message, req.tools)
        ids = self._truncated(req, ids)
        last = req.messages[-1]
        echo = [message_text(last, len(req.messages) - 1)] if req.echo and last.role == "assistant" else None
        return await self._run(req, [ids], response_format, chat=True, echo=echo, tools=tools)

    @api.post("/v1/loglikelihood")
    async def loglikelihood(self, req: LoglikelihoodRequest) -> dict:
        """Each continuation's ELBO estimate of log p(continuation | prompt), for ranking answers."""
        self._check_model(req.model)
        prompt = self._ids(req.prompt, "prompt")
        conts = [self._ids(c, "continuations") for c in req.continuations]
        results = await self._scores(prompt, conts, req.mc_samples, req.seed, "continuations")
        return {"object": "list", "model": self.model_name,
                "data": [{"index": i, **r} for i, r in enumerate(results)],
                "usage": {"prompt_tokens": len(prompt), "continuation_tokens": sum(map(len, conts))},
                "dllm": {"mc_samples": req.mc_samples}}

    async def _scores(self, prompt: list[int], conts: list[list[int]], mc_samples: int, seed: int,
                      param: str) -> list[dict]:
        """Each continuation's ELBO estimate of log p(continuation | prompt), scored on the replicas at once."""
        for k, ids in enumerate(conts):
            if not ids:
                raise APIError(400, f"{param} {k} is empty", param=param, code="invalid_value")
            if len(prompt) + len(ids) > self.max_model_len:
                raise APIError(400, f"the prompt + {param} {k} is {len(prompt) + len(ids)} tokens; the model's "
                                    f"context is {self.max_model_len}", param=param, code="context_length_exceeded")
        calls = [self.engine.loglikelihood.remote({"prompt_ids": prompt, "continuation_ids": ids,
                                                   "mc_samples": mc_samples, "seed": seed}) for ids in conts]
        try:
            return await asyncio.gather(*calls)
        except Exception as e:
            raise self._engine_error(e) from e

    async def _guided(self, req, prompts: list[list[int]], chat: bool, echo: list[str] | None):
        """guided_choice (vLLM's): each prompt's answer is the choice of the highest ELBO estimate of
        log p(choice | prompt), as LLaDA ranks multiple-choice answers (DEFAULT_MC_SAMPLES masked copies per
        choice, as /v1/loglikelihood's default, seeded by the request's seed): the whole string's likelihood, where
        an autoregressive server follows the likeliest token path through the choices. The n samples of a prompt
        share its choice; sampling parameters and stops do not apply."""
        choices = [self._ids(c, "guided_choice") for c in req.guided_choice]
        lasts = []
        for ids in prompts:
            scores = await self._scores(ids, choices, DEFAULT_MC_SAMPLES, req.seed or 0, "guided_choice")
            best = max(range(len(choices)), key=lambda k: scores[k]["loglikelihood"])  # the first of equals
            chosen = {"token_ids": choices[best], "text": req.guided_choice[best], "finished": True, "logprobs": None,
                      "finish_reason": "stop", "num_blocks": 0, "completion_tokens": len(choices[best]),
                      "prompt_tokens": len(ids), "cached_prompt_tokens": 0}
            forwards = sum(s["forwards"] for s in scores)  # counted once for the prompt's n samples
            lasts += [{**chosen, "num_forwards": forwards if i == 0 else 0} for i in range(req.n)]
        prefixes = [text for text in echo for _ in range(req.n)] if echo else None
        rid = new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            return StreamingResponse(self._sse([], rid, chat, req.stream_options, prefixes, req.n, ready=lasts),
                                     media_type="text/event-stream")
        texts = [(prefixes[i] if prefixes else "") + last["text"] for i, last in enumerate(lasts)]
        return self._final_body(rid, chat, texts, lasts, req.n, None)

    @api.post("/tokenize")
    async def tokenize(self, req: TokenizeRequest) -> dict:
        """Token ids as the completion routes see them (vLLM's /tokenize)."""
        self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either 'prompt' or 'messages'", param="prompt", code="invalid_value")
        if req.tools is not None and req.messages is None:
            raise APIError(400, "tools go with messages (they are shown to the chat template)", param="tools",
                           code="invalid_value")
        tool_functions(req.tools or [])  # a bad tool is the chat route's 400 here too
        ids = self._ids(req.prompt, "prompt") if req.prompt is not None \
            else self._chat_ids(req.messages, req.add_generation_prompt, req.continue_final_message, req.tools)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    @api.post("/detokenize")
    async def detokenize(self, req: DetokenizeRequest) -> dict:
        self._check_model(req.model)
        return {"prompt": self.tokenizer.decode(self._checked_ids(req.tokens, param="tokens"))}

    def _chat_ids(self, messages, add_generation_prompt: bool, continue_final_message: bool,
                  tools: list | None = None) -> list[int]:
        """The prompt's token ids: the messages in the model's chat template (with the tools, for a template that
        shows them to the model); with continue_final_message the text ends with the final message's content, left
        open (no end-of-turn token after it)."""
        conversation = chat_conversation(messages, add_generation_prompt, continue_final_message)
        try:
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False, tools=tools or None,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=continue_final_message)
        except (ValueError, jinja2.TemplateError) as e:  # e.g. a final message the template does not reproduce,
            # or the template's own raise_exception (say, roles out of the order it accepts)
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages",
                           code="invalid_value") from e
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # ----- shared request path ----------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def _check_common(self, req) -> tuple[ForcedCall | ParsedCalls | None, tuple[str | None, dict | None]]:
        """A request's checks shared by both routes; returns what a chat request's tools make of its answers, and
        its response format (protocol.response_format_of)."""
        self._check_model(req.model)
        fold_structured_outputs(req)
        tools = tool_use(req, self.tool_call_parser) if isinstance(req, ChatCompletionRequest) else None
        response_format = reject_unsupported(req, tools)
        if req.max_tokens is not None and not 1 <= req.max_tokens <= self.max_tokens_cap:
            raise APIError(400, f"max_tokens must be between 1 and {self.max_tokens_cap}, got {req.max_tokens}",
                           param="max_tokens", code="invalid_value")
        if req.max_tokens is not None and req.min_tokens > req.max_tokens:
            raise APIError(400, f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({req.max_tokens})",
                           param="min_tokens", code="invalid_value")
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop must be up to 4 non-empty strings", param="stop", code="invalid_value")
        self._checked_ids(req.stop_token_ids or [], param="stop_token_ids")
        self._checked_ids(req.allowed_token_ids or [], param="allowed_token_ids")
        if self.mask_token_id in (req.allowed_token_ids or ()):
            raise APIError(400, f"allowed_token_ids holds the mask token {self.mask_token_id}, which is never "
                                "generated", param="allowed_token_ids", code="invalid_value")
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options go with stream: true", param="stream_options", code="invalid_value")
        if req.truncate_prompt_tokens == 0:
            raise APIError(400, "truncate_prompt_tokens must be -1 (as many as leave room for one block) or >= 1",
                           param="truncate_prompt_tokens", code="invalid_value")
        if req.priority != 0 and self.scheduling_policy != "priority":
            raise APIError(400, f"priority {req.priority} needs a server whose scheduling_policy is priority; this one "
                                "serves first come, first served", param="priority", code="invalid_value")
        return tools, response_format

    def _ids(self, text_or_ids: str | list[int], param: str) -> list[int]:
        """Token ids of a string (tokenised) or of a list of ids (checked against the vocabulary)."""
        if isinstance(text_or_ids, str):
            return self.tokenizer(text_or_ids, add_special_tokens=False)["input_ids"]
        return self._checked_ids(list(text_or_ids), param)

    def _checked_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        bad = [t for t in ids if not 0 <= t < len(self.tokenizer)]
        if bad:
            raise APIError(400, f"{param} ids {bad[:5]} are outside the vocabulary [0, {len(self.tokenizer)})",
                           param=param, code="invalid_value")
        return ids

    def _truncated(self, req, ids: list[int]) -> list[int]:
        """The prompt's last truncate_prompt_tokens tokens (vLLM's; -1: as many as leave room for one block)."""
        keep = req.truncate_prompt_tokens
        if keep == -1:
            keep = self.max_model_len - (req.block_size or self.default_block_size)
        return ids[-keep:] if keep is not None and 0 < keep < len(ids) else ids

    async def _run(self, req, prompts: list[list[int]], response_format: tuple[str | None, dict | None], chat: bool,
                   echo: list[str] | None = None, tools: ForcedCall | ParsedCalls | None = None):
        """Generate req.n choices per prompt (choice index = prompt index * n + sample index), all in
        the engine's batch at once. Sample i of a seeded request uses seed + i, so the n samples differ
        under temperature > 0 and the request stays reproducible. `response_format`: _check_common's; `tools`: what
        the chat request's tools make of its answers (serve.tools)."""
        block = req.block_size or self.default_block_size
        if self.max_block_size is not None and block > self.max_block_size:
            raise APIError(400, f"block_size {block} is larger than this server's max_block_size {self.max_block_size}",
                           param="block_size", code="invalid_value")
        param = "messages" if chat else "prompt"
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={req.n} asks for {len(prompts) * req.n} choices; "
                                f"at most {MAX_CHOICES} per request", param="n" if len(prompts) == 1 else "prompt",
                           code="invalid_value")
        for k, ids in enumerate(prompts):
            which = "the prompt" if len(prompts) == 1 else f"prompt {k}"
            if not ids:
                raise APIError(400, f"{which} is empty", param=param, code="invalid_value")
            if len(ids) + block > self.max_model_len:
                raise APIError(400, f"{which} has {len(ids)} tokens; with one block of {block} it exceeds the "
                                    f"model's context of {self.max_model_len} tokens", param=param,
                               code="context_length_exceeded")
        if req.guided_choice is not None:
            return await self._guided(req, prompts, chat, echo)
        options = {name: getattr(req, name) for name in DiffusionOptions.model_fields}
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if isinstance(tools, ParsedCalls) and req.parallel_tool_calls is False:
            stop = [*stop, tools.end]  # one call at most: the answer ends where the first call's block does
        bias = logit_bias_ids(req)
        self._checked_ids(list(bias or ()), param="logit_bias")
        # The request's own GenerationConfig fields; the diffusion options merge with the replica's defaults.
        sampling = {"temperature": req.temperature, "stop": stop or None, "stop_token_ids": req.stop_token_ids or None,
                    "include_stop_str_in_output": req.include_stop_str_in_output,
                    "skip_special_tokens": req.skip_special_tokens, "allowed_token_ids": req.allowed_token_ids,
                    "logprobs": logprobs_wanted(req), "ignore_eos": req.ignore_eos, "min_tokens": req.min_tokens,
                    "top_k": max(req.top_k, 0), "top_p": req.top_p, "min_p": req.min_p, "logit_bias": bias,
                    "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
                    "repetition_penalty": req.repetition_penalty,
                    **dict(zip(("response_format", "json_schema"), response_format)),
                    "stream_settled": req.stream}  # a stream sends each block's settled prefix as it grows
        payloads = [{"prompt_ids": ids, "max_tokens": req.max_tokens, "options": options, "priority": req.priority,
                     "sampling": {**sampling, "seed": None if req.seed is None else req.seed + i}}
                    for ids in prompts for i in range(req.n)]
        prefixes = [text for text in echo for _ in range(req.n)] if echo else None
        rid = new_id("chatcmpl" if chat else "cmpl")
        if req.stream:
            return StreamingResponse(self._sse(payloads, rid, chat, req.stream_options, prefixes, req.n, tools=tools),
                                     media_type="text/event-stream")
        streams = self._submit(payloads)
        texts, lasts = list(prefixes or [""] * len(streams)), [None] * len(streams)
        logprobs: list[list] = [[] for _ in streams]
        try:
            async with contextlib.aclosing(_merged(streams)) as merged:
                async for index, item in merged:
                    texts[index] += item["text"]
                    logprobs[index] += item["logprobs"] or []
                    lasts[index] = item
        except Exception as e:
            raise self._engine_error(e) from e
        wanted = logprobs_wanted(req) is not None
        return self._final_body(rid, chat, texts, lasts, req.n, logprobs if wanted else None, tools)

    def _submit(self, payloads: list[dict]) -> list:
        """One engine stream per choice; they join the replicas' batches as they arrive."""
        return [self.engine.options(stream=True).generate.remote(payload) for payload in payloads]

    def _engine_error(self, e: Exception) -> APIError:
        from ray.serve.exceptions import BackPressureError

        if isinstance(e, BackPressureError):
            return APIError(503, "the server is overloaded; retry later", type="server_error", code="overloaded")
        cause = getattr(e, "cause", None) or e
        if isinstance(cause, ValueError):
            return APIError(400, str(cause), code="invalid_value")
        return APIError(500, f"generation failed: {cause}", type="server_error", code="internal_error")

    @staticmethod
    def _stats(lasts: list[dict]) -> dict:
        """Forwards and blocks summed over the choices; tokens per forward over all of them."""
        forwards = sum(last["num_forwards"] for last in lasts)
        return {"forwards": forwards, "blocks": sum(last["num_blocks"] for last in lasts),
                "tokens_per_forward": sum(last["completion_tokens"] for last in lasts) / max(1, forwards)}

    @staticmethod
    def _usage(lasts: list[dict], n: int) -> dict:
        """Each prompt counted once, however many samples (n) it has; its cached tokens are those none of
        its samples ran through the model (their K/V came from the prefix cache)."""
        per_prompt = [lasts[k:k + n] for k in range(0, len(lasts), n)]
        return usage(sum(s[0]["prompt_tokens"] for s in per_prompt),
                     sum(last["completion_tokens"] for last in lasts),
                     sum(min(last["cached_prompt_tokens"] for last in s) for s in per_prompt))

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _logprobs_body(self, chat: bool, entries: list | None, text_offset: int = 0) -> dict | None:
        if entries is None:
            return None
        return chat_logprobs(entries, self._token_text) if chat else \
            completion_logprobs(entries, self._token_text, text_offset)

    def _final_body(self, rid: str, chat: bool, texts: list[str], lasts: list[dict], n: int,
                    logprobs: list[list] | None, tools: ForcedCall | ParsedCalls | None = None) -> dict:
        """The whole response; `tools`: what the chat request's tools make of each answer (serve.tools)."""
        base = {"id": rid, "created": now(), "model": self.model_name, "usage": self._usage(lasts, n),
                "dllm": self._stats(lasts)}
        per_choice = [self._logprobs_body(chat, entries) for entries in logprobs] if logprobs else [None] * len(texts)
        if chat:
            answers = [chat_message(text, tools, last["finish_reason"]) for text, last in zip(texts, lasts)]
            choices = [{"index": i, "message": message, "finish_reason": reason, "logprobs": lp}
                       for i, ((message, reason), lp) in enumerate(zip(answers, per_choice))]
            return {**base, "object": "chat.completion", "choices": choices}
        choices = [{"index": i, "text": text, "finish_reason": last["finish_reason"], "logprobs": lp}
                   for i, (text, last, lp) in enumerate(zip(texts, lasts, per_choice))]
        return {**base, "object": "text_completion", "choices": choices}

    async def _sse(self, payloads: list[dict], rid: str, chat: bool, stream_options: StreamOptions | None,
                   prefixes: list[str] | None, n: int, ready: list[dict] | None = None,
                   tools: ForcedCall | ParsedCalls | None = None):
        """One chunk per committed block of each choice (tagged with its index), a finish chunk per
        choice, then the usage chunk (stream_options.include_usage) and [DONE]; with continuous_usage_stats too,
        every chunk carries its choice's usage so far (vLLM's). `ready`: the choices' final items, known already
        (guided_choice), streamed as one block each instead of payloads submitted to the replicas. `tools`: what
        the chat request's tools make of each answer, streamed as OpenAI streams calls (serve.tools.ChatDeltas)."""
        created = now()
        obj = "chat.completion.chunk" if chat else "text_completion"
        include_usage = stream_options is not None and stream_options.include_usage
        continuous = include_usage and stream_options.continuous_usage_stats

        def chunk(index: int, text: str | None, finish: str | None = None, extra: dict | None = None,
                  logprobs: list | None = None, delta: dict | None = None) -> str:
            lp = self._logprobs_body(chat, logprobs, offsets[index])
            if lp is not None and not chat:
                offsets[index] += sum(map(len, lp["tokens"]))
            if chat:
                delta = {**({"role": "assistant"} if index not in started else {}), **(delta or {})}
                choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": lp}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": lp}
            started.add(index)
            body = {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [choice],
                    **(extra or {})}
            if continuous:
                body["usage"] = usage(prompt_tokens[index], generated[index], cached[index])
            return f"data: {json.dumps(body)}\n\n"

        started: set[int] = set()
        choices = len(ready) if ready is not None else len(payloads)
        prompt_tokens = [item["prompt_tokens"] for item in ready] if ready is not None \
            else [len(p["prompt_ids"]) for p in payloads]
        generated = [0] * choices  # each choice's tokens streamed so far
        cached = [0] * choices  # its prompt tokens from the prefix cache (known when it finishes)
        deltas = [ChatDeltas(tools) for _ in range(choices)]
        offsets = [0] * choices  # text_offset of each choice's next token (completions logprobs)
        lasts: list[dict | None] = [None] * choices
        streams = self._submit(payloads)  # here, not before: a response never started submits nothing
        source = _merged(streams) if ready is None else _indexed(ready)
        try:
            for index, prefix in enumerate(prefixes or []):
                yield chunk(index, prefix, delta={"content": prefix} if prefix else None)
            async with contextlib.aclosing(source) as merged:  # a client that hangs up closes it
                async for index, item in merged:
                    generated[index] = item.get("completion_tokens", generated[index] + len(item["token_ids"]))
                    cached[index] = item.get("cached_prompt_tokens", 0)
                    delta = deltas[index].feed(item["text"], item["finished"]) if chat else None
                    if delta or (not chat and item["text"]) or item["logprobs"] or index not in started:
                        yield chunk(index, item["text"], logprobs=item["logprobs"], delta=delta)
                    if item["finished"]:
                        lasts[index] = item
                        yield chunk(index, None, deltas[index].finish_reason(item["finish_reason"]),
                                    extra={"dllm": self._stats([item])})
            if include_usage:
                body = {"id": rid, "object": obj, "created": created, "model": self.model_name, "choices": [],
                        "usage": self._usage(lasts, n)}
                yield f"data: {json.dumps(body)}\n\n"
        except Exception as e:  # headers are sent: report the error in-band, as OpenAI does
            yield f"data: {json.dumps(self._engine_error(e).body())}\n\n"
        finally:  # also when the client left during the echo, before any engine item: abort what still runs
            for stream, last in zip(streams, lasts):
                if last is None:
                    stream.cancel()
        yield "data: [DONE]\n\n"


# ----- building the application ----------------------------------------------------------------

def _gpus_available() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def _chat_template(value: str) -> str:
    """The app's `chat_template` (vLLM's --chat-template): a file's path, read here so that the template travels
    with the app to every replica, or the Jinja template itself. Syntax errors fail here, before any replica starts."""
    path = Path(os.path.expanduser(value))
    if path.is_file():
        text = path.read_text()
    elif "{{" in value or "{%" in value:
        text = value
    else:
        raise ValueError(f"build_app: chat_template={value!r} is neither a file nor a Jinja template "
                         "(a template holds '{{' or '{%')")
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"build_app: the chat template does not parse: {e} (line {e.lineno})") from e
    return text


def _flag(value, name: str) -> bool:
    """A boolean argument, from YAML (a bool) or from `serve run key=value` (a string)."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"build_app: {name}={value!r} is not a boolean; use true or false")


def build_app(args: dict[str, Any]):
    """Application builder (`serve run serve.app:build_app model=DIR key=value ...`).

    Keys: model (required), name, max_batch_size, max_model_len, kv_cache_tokens (the paged K/V pool's size per
    replica; default max_batch_size x max_model_len) or gpu_memory_utilization (the pool sized from GPU memory: what
    is left of that share after the weights and the measured peak of a full batch at max_block_size; CUDA only),
    max_block_size (requests with larger blocks get a 400; with gpu_memory_utilization it defaults to the decoding
    block size), max_prefill_tokens (padded prompt tokens one prefill forward may hold: the engine's default 8192;
    lower it where a full prefill does not fit beside the pool), page_allocation (on_demand, the default: pages as answers grow, preempting when the pool runs out;
    or reserve), preemption_mode (swap, the default: a preempted request's K/V through host memory, up to swap_space
    GiB, default 4; or recompute: rebuilt by forwards), scheduling_policy (fcfs, the default, or priority: each
    request's `priority`, lower first, and urgent requests preempt less urgent ones), dtype, quantization (fp8: FP8
    weights for the block projections, see dllm.quantization; default none), prefix_caching (true / false, default true), routing
    (prompt_affinity, the default, or power_of_two), max_tokens_cap, api_keys (comma separated), num_gpus (default 1
    when the cluster has GPUs, else 0), num_cpus, min_replicas / max_replicas / target_ongoing_requests /
    upscale_delay_s / downscale_delay_s (autoscaling) or num_replicas, max_ongoing_requests, max_queued_requests,
    decoding (dict of decoding defaults), chat_template (a Jinja template or a file holding one, in place of the
    checkpoint's), tool_call_parser (hermes: tool_choice "auto" answers freely and the calls the model writes in that
    format are taken out of its text, see serve.tools; default none: "auto" is a 400), tensor_parallel_size (only
    1). dtype is one of dllm.checkpoint.INFERENCE_DTYPES.
    """
    args = dict(args)
    if "model" not in args:
        raise ValueError("build_app needs model=<checkpoint directory>")
    model = str(args.pop("model"))
    if int(args.pop("tensor_parallel_size", 1)) != 1:
        raise ValueError("tensor_parallel_size > 1 is not supported: a replica holds the whole model on one GPU "
                         "(LLaDA-8B bf16 needs ~16 GB + KV cache); scale out with replicas instead")
    max_batch = int(args.pop("max_batch_size", 16))
    num_gpus = float(args.pop("num_gpus", 1 if _gpus_available() else 0))
    num_cpus = float(args.pop("num_cpus", 1))
    max_model_len = args.pop("max_model_len", None)
    max_model_len = int(max_model_len) if max_model_len is not None else None
    kv_cache_tokens = args.pop("kv_cache_tokens", None)
    kv_cache_tokens = int(kv_cache_tokens) if kv_cache_tokens is not None else None
    max_block_size = args.pop("max_block_size", None)
    max_block_size = int(max_block_size) if max_block_size is not None else None
    max_prefill_tokens = args.pop("max_prefill_tokens", None)
    if max_prefill_tokens is not None:
        max_prefill_tokens = int(max_prefill_tokens)
        if max_prefill_tokens < 1:
            raise ValueError(f"build_app: max_prefill_tokens={max_prefill_tokens} is not a number of tokens >= 1")
    gpu_memory_utilization = args.pop("gpu_memory_utilization", None)
    if gpu_memory_utilization is not None:
        gpu_memory_utilization = float(gpu_memory_utilization)
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"build_app: gpu_memory_utilization={gpu_memory_utilization} is not in (0, 1]")
        if kv_cache_tokens is not None:
            raise ValueError("build_app: give kv_cache_tokens or gpu_memory_utilization, not both")
    page_allocation = args.pop("page_allocation", "on_demand")
    if page_allocation not in dllm.engine.PAGE_ALLOCATIONS:
        raise ValueError(f"build_app: page_allocation={page_allocation!r} is not one of "
                         f"{', '.join(dllm.engine.PAGE_ALLOCATIONS)}")
    preemption_mode = args.pop("preemption_mode", "swap")
    if preemption_mode not in dllm.engine.PREEMPTION_MODES:
        raise ValueError(f"build_app: preemption_mode={preemption_mode!r} is not one of "
                         f"{', '.join(dllm.engine.PREEMPTION_MODES)}")
    scheduling_policy = args.pop("scheduling_policy", "fcfs")
    if scheduling_policy not in dllm.engine.SCHEDULING_POLICIES:
        raise ValueError(f"build_app: scheduling_policy={scheduling_policy!r} is not one of "
                         f"{', '.join(dllm.engine.SCHEDULING_POLICIES)}")
    swap_space = float(args.pop("swap_space", 4.0))
    if not 0 <= swap_space < float("inf"):
        raise ValueError(f"build_app: swap_space={swap_space} is not a number of GiB >= 0")
    decoding = _decoding_defaults(args.pop("decoding", None))
    if gpu_memory_utilization is not None and max_block_size is None:
        max_block_size = decoding["block_size"]  # the block size the replica's memory probe decodes at
    if max_block_size is not None and decoding["block_size"] > max_block_size:
        raise ValueError(f"build_app: decoding block_size {decoding['block_size']} is larger than max_block_size "
                         f"{max_block_size}")
    engine_opts: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": num_gpus, "num_cpus": num_cpus},
        "max_ongoing_requests": int(args.pop("max_ongoing_requests", 2 * max_batch)),
        "max_queued_requests": int(args.pop("max_queued_requests", 8 * max_batch)),
        "user_config": decoding,
        "health_check_period_s": float(args.pop("health_check_period_s", 10)),
        "graceful_shutdown_timeout_s": float(args.pop("graceful_shutdown_timeout_s", 30)),
    }
    routing = args.pop("routing", "prompt_affinity")
    if routing == "prompt_affinity":  # a prompt's requests meet on one replica: shared prefills, prefix cache
        engine_opts["request_router_config"] = {"request_router_class": PromptAffinityRouter,
                                                "request_router_kwargs": {"max_imbalance": max_batch}}
    elif routing != "power_of_two":
        raise ValueError(f"build_app: routing={routing!r} is not one of prompt_affinity, power_of_two")
    autoscale_keys = ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s",
                      "downscale_delay_s", "metrics_interval_s", "look_back_period_s")
    autoscaling = {k: args.pop(k) for k in autoscale_keys if k in args}
    if autoscaling:
        if "num_replicas" in args:
            raise ValueError("give either num_replicas or autoscaling keys (min_replicas, max_replicas, ...), not both")
        autoscaling.setdefault("target_ongoing_requests", max_batch)
        engine_opts["autoscaling_config"] = {k: (float(v) if k.endswith("_s") or k == "target_ongoing_requests"
                                                 else int(v)) for k, v in autoscaling.items()}
    else:
        engine_opts["num_replicas"] = int(args.pop("num_replicas", 1))
    name = args.pop("name", None)
    max_tokens_cap = int(args.pop("max_tokens_cap", 1024))
    api_keys = args.pop("api_keys", None)
    if isinstance(api_keys, str):
        api_keys = [k for k in api_keys.split(",") if k]
    ingress_cpus = float(args.pop("ingress_num_cpus", 0.5))
    dtype = args.pop("dtype", None)
    if dtype is not None and dtype not in INFERENCE_DTYPES:
        raise ValueError(f"build_app: dtype={dtype!r} is not one of {', '.join(INFERENCE_DTYPES)}")
    chat_template = args.pop("chat_template", None)
    chat_template = _chat_template(str(chat_template)) if chat_template is not None else None
    quantization = args.pop("quantization", None)
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"build_app: quantization={quantization!r} is not one of {', '.join(QUANTIZATIONS)} "
                         "(or leave it out for the weights as loaded)")
    prefix_caching = _flag(args.pop("prefix_caching", True), "prefix_caching")
    tool_call_parser = args.pop("tool_call_parser", None)
    if tool_call_parser is not None and tool_call_parser not in TOOL_CALL_PARSERS:
        raise ValueError(f"build_app: tool_call_parser={tool_call_parser!r} is not one of "
                         f"{', '.join(TOOL_CALL_PARSERS)} (or leave it out: tool_choice 'auto' is then refused)")
    if args:
        raise ValueError(f"build_app: unknown argument(s) {sorted(args)}")

    engine = serve.deployment(EngineServer, name="EngineServer").options(**engine_opts).bind(
        model, max_batch_size=max_batch, max_model_len=max_model_len, dtype=dtype, prefix_caching=prefix_caching,
        kv_cache_tokens=kv_cache_tokens, page_allocation=page_allocation, preemption_mode=preemption_mode,
        swap_space=swap_space, gpu_memory_utilization=gpu_memory_utilization, max_block_size=max_block_size,
        quantization=quantization, scheduling_policy=scheduling_policy, max_prefill_tokens=max_prefill_tokens)
    ingress = serve.deployment(OpenAIIngress, name="OpenAIIngress",
                               ray_actor_options={"num_cpus": ingress_cpus}, max_ongoing_requests=1000)
    return ingress.bind(engine, model, served_model_name=name, max_model_len=max_model_len,
                        max_tokens_cap=max_tokens_cap, api_keys=api_keys, default_block_size=decoding["block_size"],
                        max_block_size=max_block_size, chat_template=chat_template,
                        scheduling_policy=scheduling_policy, tool_call_parser=tool_call_parser)
