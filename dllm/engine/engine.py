"""The block-diffusion engine (dLLM-Var inference with continuous batching).

Per request (block size B):
1. PREFILL: one forward over prompt + B masks; the prompt's K/V become committed context and the
   block's logits drive the first decode step.
2. DENOISE: forward only the B block tokens against the cache until no mask is left.
3. When a block is finished: stop if it holds EOS/EOT/a stop token (output cut at the first one),
   a stop string, or the cap; otherwise
4. COMMIT: one forward over [finished block + B new masks] writes the block's K/V (committed
   context from then on) and is the first decode step of the next block. Go to 2.
Committed K/V is never recomputed. With `commit_pass=False` step 4 is skipped: the K/V the
block's last denoise step wrote is kept, and the next block starts with a DENOISE forward.
(One exception: a request preempted with preemption_mode="recompute" gave its K/V up, and resumes
with REBUILD forwards that write them again as steps 1 and 4 first did; see dllm.engine.scheduler.)

Every running request takes part in every step; requests whose next forward has the same shape
share it. The host syncs once per forward group (to learn which blocks are finished): the decoders'
per-request parameters reach the device before the forward is launched (`_DecodeParams`), so the
host queues forward and decode without waiting for the GPU in between. (A group with a top_p row
without top_k syncs once more in its decode, to find wide nuclei: see decoders.sampling_floor.)

On CUDA the cache is read by the pool-attention kernel and DENOISE / COMMIT forwards (fixed
shapes) replay CUDA graphs (`cuda_graphs.py`); PREFILL (any prompt length) runs eagerly. A group
whose rows all decode greedily with a stateless decoder replays its decode step as a graph too
(`decode_graphs`): its step is then two replays and the one status read.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
import random
from collections.abc import Sequence

import torch

from ..model import LLaDAModelLM
from ..quantization import QUANTIZATIONS, check_fp8_device, is_quantized, quantize_fp8
from . import decoders, json_mode, json_schema, memory
from .config import GenerationConfig
from .cuda_graphs import GraphedForward
from .decoders import STATELESS
from .kv_cache import DEFAULT_PAGE_SIZE, KVCache
from .request import BlockTrajectory, Generation, Phase, Request, RequestOutput, TokenLogprob
from .scheduler import Scheduler


class _DecodeParams:
    """One forward group's per-request decoder parameters, copied to the device before its forward
    is launched: a host->device copy after the launch would wait for the forward to finish (a host
    sync inside the step). Rows of `thresholds` are the unrolled steps (smoothing decays it per step)."""

    def __init__(self, engine: "Engine", reqs: list[Request], steps: int) -> None:
        dev = engine.device

        def on_device(values) -> torch.Tensor:
            return torch.tensor(values, device=dev)

        self.host_thresholds = [[engine._threshold(r, ahead=u) for r in reqs] for u in range(steps)]
        self.thresholds = on_device(self.host_thresholds)
        # JSON-mode rows (GenerationConfig.response_format): they choose their tokens on the host (json_mode).
        self.json_rows = [i for i, r in enumerate(reqs) if r.config.response_format is not None]
        self.json_index = on_device(self.json_rows) if self.json_rows else None
        # Sampled rows (temperature > 0; the others take the argmax and draw nothing) and their temperatures.
        self.sampled_rows = [i for i, r in enumerate(reqs)
                             if r.config.temperature > 0 and r.config.response_format is None]
        self.sampled_index = on_device(self.sampled_rows) if self.sampled_rows else None
        self.temperatures = on_device([reqs[i].config.temperature for i in self.sampled_rows])
        # Sampled rows that restrict their candidates (top_k / top_p / min_p; greedy rows need nothing).
        narrowed = [i for i in self.sampled_rows if reqs[i].config.top_k > 0 or reqs[i].config.top_p < 1
                    or reqs[i].config.min_p > 0]
        self.narrowed_index = on_device(narrowed) if narrowed else None
        if narrowed:
            self.narrowed_among_sampled = on_device([self.sampled_rows.index(i) for i in narrowed])
            cfgs = [reqs[i].config for i in narrowed]
            self.narrowing = [on_device([getattr(c, x) for c in cfgs])
                              for x in ("temperature", "top_k", "top_p", "min_p")]
            self.nucleus = any(c.top_p < 1 for c in cfgs)
            self.open_nucleus = any(c.top_p < 1 and not c.top_k for c in cfgs)  # ranked, then checked
            self.ranked = max(c.top_k for c in cfgs)
            if self.open_nucleus:
                self.ranked = max(self.ranked, engine.nucleus_candidates or engine.config.embedding_size)
            self.nucleus_syncs = int(decoders.checks_wide_nuclei(self.open_nucleus, self.ranked,
                                                                 engine.config.embedding_size))
        allowed = [i for i, r in enumerate(reqs) if r.allowed is not None]
        self.allowed_index = on_device(allowed) if allowed else None
        self.allowed = torch.stack([reqs[i].allowed for i in allowed]) if allowed else None
        biased = [i for i, r in enumerate(reqs) if r.config.logit_bias]
        self.bias_index = on_device(biased) if biased else None
        if biased:
            width = max(len(reqs[i].config.logit_bias) for i in biased)
            items = [sorted(reqs[i].config.logit_bias.items()) for i in biased]
            self.bias_ids = on_device([[t for t, _ in it] + [-1] * (width - len(it)) for it in items])
            self.bias_values = on_device([[float(b) for _, b in it] + [0.0] * (width - len(it)) for it in items])
        self.penalty_rows = [i for i, r in enumerate(reqs) if r.config.penalised]
        if self.penalty_rows:
            cfgs = [reqs[i].config for i in self.penalty_rows]
            self.penalty_index = on_device(self.penalty_rows)
            self.penalties = [on_device([float(getattr(c, f"{x}_penalty")) for c in cfgs])
                              for x in ("presence", "frequency", "repetition")]
            # Only the tokens seen so far are penalised: the prompt's and the finished blocks' (listed here,
            # padded with MASK, which no penalty touches), and the current block's (on the device).
            for i in self.penalty_rows:
                r = reqs[i]
                if r.history_tokens is None or r.history_tokens[0] != len(r.generated):
                    r.history_tokens = (len(r.generated), on_device(sorted(set(r.prompt_ids) | set(r.generated))))
            width = max(len(reqs[i].history_tokens[1]) for i in self.penalty_rows)
            self.penalty_columns = torch.stack([
                torch.nn.functional.pad(t, (0, width - len(t)), value=engine.mask_id)
                for t in (reqs[i].history_tokens[1] for i in self.penalty_rows)])
        by_kind: dict[str, list[int]] = {}
        for i, r in enumerate(reqs):
            by_kind.setdefault(r.config.decoder, []).append(i)
        self.kinds = []  # (decoder, its rows, its own per-row parameter or None)
        for kind, rows in by_kind.items():
            name = decoders.OWN_PARAMETER.get(kind)
            param = on_device([getattr(reqs[i].config, name) for i in rows]) if name else None
            self.kinds.append((kind, on_device(rows), param))
        self.credit_rows = by_kind.get("credit", [])
        if self.credit_rows:
            cfgs = [reqs[i].config for i in self.credit_rows]
            self.credit_index = on_device(self.credit_rows)
            self.credit_abg = [on_device([getattr(c, f"credit_{x}") for c in cfgs]) for x in ("alpha", "beta", "gamma")]
            # No credit decay on a block's first step: only the first unrolled step can be one.
            self.credit_first = on_device([reqs[i].block_steps == 0 for i in self.credit_rows])
        early = [i for i, r in enumerate(reqs) if r.config.early_stop]
        self.early = on_device([r.config.early_stop for r in reqs]) if early else None  # [n] bool
        last = [i for i, r in enumerate(reqs) if r.config.stops_last]
        self.stops_last_index = on_device(last) if last else None
        # [n, w]: each row's stop ids, padded with -1 (early_stop, stops_last, min_tokens, penalties)
        self.stop_ids = None
        # Per stops_last row: its decoder commits every position at or above its threshold.
        self.commits_above_threshold = on_device([reqs[i].config.decoder in decoders.COMMIT_ABOVE_THRESHOLD
                                                  for i in last]) if last else None
        # Rows that return logprobs, and the most alternatives any of them asked for.
        self.logprob_rows = [i for i, r in enumerate(reqs) if r.config.logprobs is not None]
        self.logprob_index = on_device(self.logprob_rows) if self.logprob_rows else None
        self.top_logprobs = max((reqs[i].config.logprobs for i in self.logprob_rows), default=0)
        # min_tokens: rows whose block still holds positions where no stop token may go, and how many.
        young = [i for i, r in enumerate(reqs) if r.min_tokens_pending]
        self.min_tokens_index = on_device(young) if young else None
        self.min_tokens_limit = on_device([reqs[i].config.min_tokens - len(reqs[i].generated)
                                           for i in young]) if young else None
        if early or last or young or self.penalty_rows:
            width = max(len(r.stop_ids) for r in reqs)
            self.stop_ids = on_device([sorted(r.stop_ids) + [-1] * (width - len(r.stop_ids)) for r in reqs])


def _decodes_in_graph(r: Request) -> bool:
    """Whether `r`'s decode step is decoders.greedy_step: greedy, a stateless decoder, and nothing that
    changes the logits or needs more than the new block (bias, allowed tokens, penalties, min_tokens still
    pending, logprobs, smoothing, the trajectory's per-step reads, JSON mode's host-side choice)."""
    c = r.config
    return (c.temperature == 0 and c.decoder in decoders.STATELESS and not c.logit_bias
            and not c.allowed_token_ids and not c.penalised and c.logprobs is None and not c.smoothing
            and not c.record_trajectory and c.response_format is None and not r.min_tokens_pending)


class _SharedPrefill:
    """Rows of a PREFILL group whose prompt repeats an earlier row's (n samples of one prompt, retries;
    see Scheduler.admit): their forward, prompt + B masks, is the same, so it runs once per distinct
    prompt. After it, each sharer gets the prompt K/V of the pages it does not map from the row that
    ran (its prompt's partly filled last page, or every page where its prompt K/V will be refreshed).
    Every index is put on the device before the forward is launched (no host->device copy after it)."""

    def __init__(self, engine: "Engine", reqs: list[Request], source: list[int]) -> None:
        self.rows = sorted(set(source))  # the rows that run: one per distinct prompt
        on_device = functools.partial(torch.tensor, device=engine.device)
        self.rows_index = on_device(self.rows)
        rank = {row: j for j, row in enumerate(self.rows)}
        self.expand = on_device([rank[s] for s in source])  # each row's logits: its prompt's row
        cache = engine.cache
        copies = []  # (page of the row that ran, page of a sharer)
        for i, s in enumerate(source):
            n = cache.pages_for(len(reqs[i].prompt_ids))
            copies += [(a, b) for a, b in zip(cache.pages(reqs[s].slot)[:n], cache.pages(reqs[i].slot)[:n]) if a != b]
        self.from_pages = on_device([a for a, _ in copies]) if copies else None
        self.to_pages = on_device([b for _, b in copies]) if copies else None
        self.saved = len(source) - len(self.rows)

    @staticmethod
    def find(engine: "Engine", reqs: list[Request]) -> "_SharedPrefill | None":
        row = {id(r): i for i, r in enumerate(reqs)}
        # The scheduler keeps a prefill's sharers in its batch: their full pages may be its pages.
        source = [row[id(r.prefill_source)] if r.prefill_source is not None else i for i, r in enumerate(reqs)]
        return _SharedPrefill(engine, reqs, source) if any(s != i for i, s in enumerate(source)) else None


class Engine:
    """Continuous-batching dLLM-Var engine over one model replica.

    max_batch_size:     requests decoded concurrently (more wait in a queue)
    max_model_len:      cache positions one request may use (prompt + generated, in whole blocks);
                        default the model's max_sequence_length
    kv_cache_tokens:    size of the paged K/V pool in tokens (rounded up to whole pages); default
                        max_batch_size * max_model_len. A request holds the pages of what it has written
                        (page_allocation), so a pool smaller than the default serves max_batch_size
                        requests of typical length
    page_size:          cache positions per page
    page_allocation:    "on_demand" (default): a request gets pages block by block as its answer grows;
                        if the pool runs out, the newest running request is preempted (it gives its
                        pages back and resumes later with the same K/V). "reserve": the pages of its
                        prompt and max_new_tokens at admission, never preempted (see dllm.engine.scheduler)
    preemption_mode:    how a preempted request gets its K/V back: "swap" (default): through host memory,
                        bit for bit; "recompute": forwards of the tokens that first wrote them write them
                        again (no host memory; a forward per committed block, batched with the other
                        requests rebuilding). Requests without the commit pass are swapped either way.
    swap_space:         GiB of host memory the swapped K/V may take at once (vLLM's knob, its default 4);
                        beyond it a preempted request is recomputed instead, unless its K/V cannot be
                        rebuilt (no commit pass). None: no limit.
    scheduling_policy:  "fcfs" (default): requests are admitted, and keep their pages, in arrival order;
                        "priority" (vLLM's): by each request's priority (add_request; lower first), then
                        arrival; a request that does not fit preempts running ones of a larger priority
                        value (see dllm.engine.scheduler).
    gpu_memory_utilization: size the pool from the GPU's memory instead of kv_cache_tokens (vLLM's
                        knob): it gets what is left of this share of the GPU's memory after what the
                        device holds, the weights and the measured peak of a probe that runs this
                        engine's largest forwards (see dllm.engine.memory); CUDA only. The breakdown
                        is in `memory_plan`.
    max_block_size:     requests with a larger block_size are refused (a forward's activations and
                        logits grow with it). Default: no limit but GenerationConfig's; with
                        gpu_memory_utilization, 64 (GenerationConfig's default), the block size the
                        probe decodes a full batch at
    max_prefill_tokens: padded tokens one prefill forward may hold
    cuda_graphs:        replay CUDA graphs for DENOISE / COMMIT forwards; default: on where the
                        model is on CUDA and triton is installed
    decode_graphs:      with cuda_graphs, groups whose rows all decode greedily with a stateless
                        decoder (threshold, factor, hierarchical, fixed_k; no logit_bias, allowed_token_ids,
                        penalties, pending min_tokens, logprobs, smoothing or trajectory) replay their decode
                        step as a graph too (decoders.greedy_step): same tokens, two replays per step
                        instead of the decoder's small launches. Default: on with cuda_graphs
    compile_blocks:     fuse each block's elementwise work with torch.compile (model.compile_blocks);
                        default: on with CUDA graphs. The first steps of a new shape pay the compile.
    fuse_projections:   one Q/K/V and one gate/up matmul per block instead of five
                        (model.fuse_projections; parameters and state_dict unchanged). Default off:
                        measured neutral on an H100 (a graphed 8B decode step 7.56 vs 7.49 ms: the
                        wider Q/K/V matmul gains what the strided rotary input loses) and on CPU.
    max_unroll:         DENOISE steps run back to back before the host looks (dInfer's loop
                        unrolling): k = clamp(masks left // expected_tpf, 1, max_unroll). Same tokens;
                        extra forwards on blocks that finish early are counted.
    share_prefills:     requests prefilled together with the same prompt (the n samples of one prompt)
                        share one prefill row: its prompt K/V are copied to the others' slots. Same
                        tokens; False runs every row (the baseline of that saving).
    prefix_caching:     a request whose prompt (with its block size) an earlier request prefilled skips
                        its prefill: it maps the pages holding that prompt's K/V (a running request's,
                        or kept since one ended; a partly filled last page is copied), and its first
                        forward is a DENOISE step of the B masks. Exact, not an approximation: a
                        prefill's prompt K/V depend only on the prompt and the B masks it sees, and the
                        masks' logits are what the prefill would have given. An ended request's prompt
                        pages stay cached until the pool needs them (least recently used first).
                        Requests of the dllm-var cache policy only (the others recompute committed K/V).
    quantization:       "fp8": the block projections' weights in FP8 E4M3 with per-channel scales, their
                        inputs quantised per token at run time (dllm.quantization; vLLM's fp8 scheme),
                        applied to the model in place: half the bytes a bf16 decode step reads for them.
                        Not with fuse_projections. None (default): the weights as loaded.
    nucleus_candidates: tokens ranked first for a top_p without top_k; the whole vocabulary is ranked
                        only at positions whose nucleus is wider (found with a host sync). Same draws
                        as ranking the whole vocabulary everywhere, which 0 does (decoders.sampling_floor).
    """

    def __init__(self, model: LLaDAModelLM, tokenizer=None, *, max_batch_size: int = 8,
                 max_model_len: int | None = None, max_prefill_tokens: int = 8192,
                 cuda_graphs: bool | None = None, decode_graphs: bool | None = None,
                 compile_blocks: bool | None = None,
                 fuse_projections: bool = False, max_unroll: int = 1, expected_tpf: float = 4.0,
                 share_prefills: bool = True, prefix_caching: bool = True, kv_cache_tokens: int | None = None,
                 page_size: int = DEFAULT_PAGE_SIZE, page_allocation: str = "on_demand",
                 preemption_mode: str = "swap", swap_space: float | None = 4.0, scheduling_policy: str = "fcfs",
                 gpu_memory_utilization: float | None = None,
                 max_block_size: int | None = None, nucleus_candidates: int = decoders.NUCLEUS_CANDIDATES,
                 quantization: str | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_model_len = max_model_len or self.config.max_sequence_length
        if swap_space is not None and not 0 <= swap_space < float("inf"):
            raise ValueError(f"swap_space must be a number of GiB >= 0 (or None: no limit), got {swap_space}")
        if quantization is not None:
            if quantization not in QUANTIZATIONS:
                raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)} or None, got {quantization!r}")
            if fuse_projections:
                raise ValueError("fuse_projections does not apply to quantization='fp8' (each FP8 matrix has its "
                                 "own scales); leave it off")
            check_fp8_device(self.device)
            quantize_fp8(model)
        self.quantization = "fp8" if is_quantized(model) else None
        on_cuda = self.device.type == "cuda"
        if on_cuda:
            model.enable_pool_kernel()
        if cuda_graphs is None:
            cuda_graphs = GraphedForward.supported(model, self.device)
        if cuda_graphs and not GraphedForward.supported(model, self.device):
            raise ValueError("cuda_graphs=True needs the model on a CUDA device and triton installed "
                             "(the pool-attention kernel keeps graph shapes independent of the cache length)")
        if decode_graphs and not cuda_graphs:
            raise ValueError("decode_graphs=True needs cuda_graphs (a decode step replays after its forward's graph)")
        self.decode_graphs = cuda_graphs if decode_graphs is None else decode_graphs
        if compile_blocks if compile_blocks is not None else cuda_graphs:
            model.compile_blocks()
        if fuse_projections:
            model.fuse_projections()
        if max_block_size is not None and not 1 <= max_block_size <= self.max_model_len - 1:
            raise ValueError(f"max_block_size must be in [1, max_model_len - 1] (a block and a prompt token), "
                             f"got {max_block_size}")
        self.memory_plan: memory.MemoryPlan | None = None
        if gpu_memory_utilization is not None:
            if kv_cache_tokens is not None:
                raise ValueError("give kv_cache_tokens or gpu_memory_utilization, not both")
            max_block_size = max_block_size or GenerationConfig.block_size
            self.memory_plan = self._plan_pool(gpu_memory_utilization, max_block_size, dict(
                max_batch_size=max_batch_size, max_model_len=self.max_model_len, max_prefill_tokens=max_prefill_tokens,
                cuda_graphs=cuda_graphs, max_unroll=max_unroll, expected_tpf=expected_tpf, page_size=page_size,
                page_allocation=page_allocation))
            kv_cache_tokens = self.memory_plan.pool_tokens
        self.max_block_size = max_block_size
        if kv_cache_tokens is not None and kv_cache_tokens < 1:
            raise ValueError(f"kv_cache_tokens must be >= 1, got {kv_cache_tokens}")
        num_pages = None if kv_cache_tokens is None else -(-kv_cache_tokens // page_size)
        self.cache = KVCache(self.config, max_batch_size, self.max_model_len, device=self.device, dtype=self.dtype,
                             page_size=page_size, num_pages=num_pages, scratch_slot=cuda_graphs)
        self.graphs = GraphedForward(model, self.cache, self.config.mask_token_id) if cuda_graphs else None
        self.scheduler = Scheduler(self.cache, max_prefill_tokens, share_prefills, prefix_caching, page_allocation,
                                   preemption_mode, None if swap_space is None else int(swap_space * 2**30),
                                   scheduling_policy)
        self.scheduling_policy = scheduling_policy
        self.share_prefills = share_prefills
        self.shared_prefills = 0  # prefill rows not run: their prompt's K/V were copied from another row
        self.prefix_cache_hits = 0  # requests that skipped their prefill (prefix_caching)
        self.prefix_cached_tokens = 0  # prompt tokens those requests did not run
        self.rebuilt_tokens = 0  # committed K/V positions written again after a preemption dropped them
        self.mask_id = self.config.mask_token_id
        stop = set(self.config.stop_token_ids)
        eot = getattr(tokenizer, "eot_token_id", None)
        if eot is not None:
            stop.add(eot)
        self.base_stop_ids = frozenset(stop)
        if max_unroll < 1 or expected_tpf <= 0:
            raise ValueError(f"need max_unroll >= 1 and expected_tpf > 0, got {max_unroll}, {expected_tpf}")
        self.max_unroll, self.expected_tpf = max_unroll, expected_tpf
        if nucleus_candidates < 0:
            raise ValueError(f"nucleus_candidates must be >= 0 (0: rank the whole vocabulary), got {nucleus_candidates}")
        self.nucleus_candidates = nucleus_candidates
        self._requests: dict[str, Request] = {}
        self._outputs: list[RequestOutput] = []
        self._json_vocab: list[bytes | None] | None = None  # each token's bytes, read when JSON mode is first asked for
        self._json_refusal: str | None = None  # or why this vocabulary cannot write JSON (read once too)
        self._ids = itertools.count()
        self.total_forwards = 0
        # block-status reads: one per forward group, or per unrolled run of steps; and a decode's search for
        # wide nuclei (top_p without top_k, decoders.sampling_floor)
        self.host_syncs = 0

    def _plan_pool(self, utilization: float, block_size: int, options: dict) -> "memory.MemoryPlan":
        """gpu_memory_utilization: measure what a throwaway engine with a small pool reaches at its
        peak (same model and options), then give the pool what is left (dllm.engine.memory)."""
        if not 0 < utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
        if self.device.type != "cuda":
            raise ValueError(f"gpu_memory_utilization sizes the K/V pool from GPU memory, but the model is on "
                             f"{self.device}: set kv_cache_tokens instead")
        load = memory.probe_load(block_size, options["max_batch_size"], options["max_model_len"],
                                 options["max_prefill_tokens"])
        device = self.device
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        # The model is prepared already (compiled, fused): the probe only decodes with it. Every row runs.
        # Its top_p rows rank the whole vocabulary at every position, as a served request's do where its
        # nucleus is wide: the decoders' largest working set, whatever this model's distributions are.
        probe = Engine(self.model, self.tokenizer, compile_blocks=False, share_prefills=False, prefix_caching=False,
                       kv_cache_tokens=load.pool_tokens(options["page_size"]), nucleus_candidates=0, **options)
        # A full batch eagerly (block sizes without graphs), then everything through the graphs: the eager
        # round's memory stays cached meanwhile, so the peak adds the two up as a server's steady state does.
        probe.warmup([])
        memory.run_probe(probe, dataclasses.replace(load, long_prompts=0))
        probe.warmup([block_size])
        memory.run_probe(probe, load)
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        other = total - free - torch.cuda.memory_reserved(device)
        activations = torch.cuda.max_memory_reserved(device) - weights - probe.cache.bytes
        del probe
        gc.collect()
        torch.cuda.empty_cache()
        return memory.plan_pool(total=total, utilization=utilization, other=other, weights=weights,
                                activations=activations,
                                bytes_per_token=memory.kv_bytes_per_token(self.config, self.dtype),
                                page_size=options["page_size"], min_tokens=options["max_model_len"])

    # ----- public API ------------------------------------------------------------------------

    def add_request(self, prompt: str | Sequence[int], config: GenerationConfig | None = None,
                    request_id: str | None = None, priority: int = 0) -> str:
        """Queue a request; returns its id. Raises ValueError for a prompt that can never fit. `priority`:
        lower runs first, under scheduling_policy="priority" only (vLLM's: any other value is refused under
        fcfs, where every request has priority 0)."""
        config = config or GenerationConfig()
        if priority != 0 and not self.scheduler.by_priority:
            raise ValueError(f"priority {priority} needs an engine with scheduling_policy='priority'; this one "
                             "serves first come, first served (priority 0 for every request)")
        prompt_ids = self.encode(prompt)
        if config.stop and self.tokenizer is None:
            raise ValueError("stop strings need an Engine with a tokenizer")
        b = config.block_size
        if self.max_block_size is not None and b > self.max_block_size:
            raise ValueError(f"block_size {b} is larger than this engine's max_block_size {self.max_block_size} "
                             f"(the largest block its memory is set aside for); use a block_size <= "
                             f"{self.max_block_size}")
        max_blocks = (self.max_model_len - len(prompt_ids)) // b
        if max_blocks < 1:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens plus one block of {b} needs {len(prompt_ids) + b} cache "
                f"positions, but a slot holds max_model_len={self.max_model_len}; shorten the prompt")
        if config.logit_bias:
            self.config.check_token_ids(config.logit_bias, "logit_bias")
        stop_ids = (frozenset() if config.ignore_eos else self.base_stop_ids) | frozenset(config.stop_token_ids or ())
        if config.allowed_token_ids:
            self._check_allowed(config, stop_ids)
        if config.response_format is not None:
            self.json_vocabulary()  # a tokenizer that can write JSON, or a clear error
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request(
            request_id=request_id, prompt_ids=prompt_ids, config=config,
            max_new_tokens=min(config.max_new_tokens, max_blocks * b),
            stop_ids=stop_ids,
            logprobs=[] if config.logprobs is not None else None, priority=int(priority),
        )
        pool = self.cache.num_pages * self.cache.page_size
        if self.cache.pages_for(req.cache_extent) > self.cache.num_pages:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens plus max_new_tokens={req.max_new_tokens} (in blocks of {b}) "
                f"needs {req.cache_extent} cache positions, but the KV cache holds {pool} (kv_cache_tokens); "
                f"shorten the prompt or lower max_new_tokens")
        if config.allowed_token_ids:
            req.allowed = torch.zeros(self.config.embedding_size, dtype=torch.bool, device=self.device).index_fill_(
                0, torch.tensor(config.allowed_token_ids, dtype=torch.long, device=self.device), True)
        if config.penalised:
            width = self.config.embedding_size
            req.output_counts = torch.zeros(width, device=self.device)
            req.in_prompt = torch.zeros(width, dtype=torch.bool, device=self.device).index_fill_(
                0, torch.tensor(prompt_ids, dtype=torch.long, device=self.device), True)
        if config.response_format is not None:
            req.json_start = json_schema.start_state(config.response_format, config.json_schema)
        if config.temperature > 0:
            seed = config.seed if config.seed is not None else random.getrandbits(63)
            req.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def _check_allowed(self, config: GenerationConfig, stop_ids: frozenset[int]) -> None:
        """allowed_token_ids that leave every position a token to take, or a ValueError saying why not."""
        allowed = set(self.config.check_token_ids(config.allowed_token_ids, "allowed_token_ids"))
        if self.mask_id in allowed:
            raise ValueError(f"allowed_token_ids holds the mask token {self.mask_id}, which is never generated")
        if config.min_tokens and allowed <= stop_ids:
            raise ValueError(f"allowed_token_ids {sorted(allowed)[:5]} are all stop tokens, which min_tokens="
                             f"{config.min_tokens} forbids in the first positions: allow a token that is not one")

    def encode(self, prompt) -> list[int]:
        """Prompt ids of a string (through the tokenizer) or of a list of ids (checked against the vocabulary)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need an Engine with a tokenizer; pass token ids instead")
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = prompt
        return self.config.check_token_ids(ids, "prompt")

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its cache slot; its last output has finish_reason 'abort'."""
        req = self._requests.get(request_id)
        if req is None or req.phase is Phase.FINISHED:
            return False
        self._finish(req, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one forward for every running request; return committed blocks and finished requests."""
        self.scheduler.make_room()
        self._admit()
        for group in self.scheduler.schedule():
            for rows in self._graph_sized(group):
                self._run_group(rows)
        outputs, self._outputs = self._outputs, []
        return outputs

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 config: GenerationConfig | Sequence[GenerationConfig] | None = None,
                 priority: int | Sequence[int] = 0) -> list[Generation]:
        """Decode all prompts together (continuous batching) and return their Generations in order."""
        configs = list(config) if isinstance(config, (list, tuple)) else [config] * len(prompts)
        priorities = list(priority) if isinstance(priority, (list, tuple)) else [priority] * len(prompts)
        if len(configs) != len(prompts) or len(priorities) != len(prompts):
            raise ValueError(f"got {len(configs)} configs and {len(priorities)} priorities for {len(prompts)} prompts")
        ids = [self.add_request(p, c, priority=k) for p, c, k in zip(prompts, configs, priorities)]
        results: dict[str, Generation] = {}
        while len(results) < len(ids):
            for out in self.step():
                if out.finished and out.request_id in ids:
                    results[out.request_id] = out.generation
        return [results[i] for i in ids]

    @torch.inference_mode()
    def warmup(self, block_sizes: Sequence[int] = (64,), decoders: Sequence[str] = ("threshold",)) -> int:
        """Capture the CUDA graphs of every batch bucket for these block sizes (and compile the fused
        blocks) before traffic arrives, with the decode-step graphs of greedy groups of each of these
        `decoders` (decode_graphs); returns the number of forward graphs (0 without CUDA graphs). From
        then on only these block sizes replay graphs: others' graphs are dropped and their forwards run
        eagerly, so graph memory stays what the warm-up took (see cuda_graphs.GraphedForward.only)."""
        if self.graphs is None:
            return 0
        self.graphs.only(block_sizes)  # dropped graphs' memory stays in the graphs' pool, for the new captures
        step_decoders = tuple(d for d in decoders if d in STATELESS) if self.decode_graphs else ()  # credit: eager
        for b in block_sizes:
            self.graphs.capture_all(b, self.cache.num_slots, step_decoders)
        return len(self.graphs.graphs)

    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "cache_slots_used": self.cache.used_slots,
            "cache_slots_total": self.cache.num_slots,
            "cache_tokens_used": sum(r.cached_len for r in self.scheduler.running),
            "cache_tokens_total": self.cache.num_pages * self.cache.page_size,
            "cache_pages_used": self.cache.used_pages,  # mapped by running requests (reserved for their length)
            "cache_pages_cached": self.cache.cached_pages,  # ended requests' prompts, kept for the prefix cache
            "cache_pages_total": self.cache.num_pages,
            "preemptions": self.scheduler.preemptions,  # running requests that gave their pages back
            "swapped_requests": self.scheduler.swapped_requests,  # waiting now with their K/V in host memory
            "swapped_bytes": self.scheduler.swapped_bytes,  # K/V bytes swapped out, in total
            "swapped_bytes_now": self.scheduler.host_bytes,  # K/V bytes in host memory now (at most swap_space)
            "dropped_preemptions": self.scheduler.dropped_preemptions,  # preemptions that dropped the K/V
            "rebuilt_tokens": self.rebuilt_tokens,  # K/V positions those wrote again (preemption_mode recompute)
            "total_forwards": self.total_forwards,
            "host_syncs": self.host_syncs,
            "shared_prefills": self.shared_prefills,
            "prefix_cache_hits": self.prefix_cache_hits,
            "prefix_cached_tokens": self.prefix_cached_tokens,
            "cuda_graphs": len(self.graphs.graphs) if self.graphs is not None else 0,
            "decode_graphs": len(self.graphs.steps) if self.graphs is not None else 0,
        }

    # ----- one forward group -----------------------------------------------------------------

    def _admit(self) -> None:
        """Give waiting requests the cache they need. With prefix caching, a request whose prompt K/V
        were cached (Scheduler.admit mapped them) starts as if its prefill had run: the prompt is
        committed context and the first forward decodes the block."""
        for req in self.scheduler.admit():
            if not req.cached_prompt_tokens:
                continue
            n = req.cached_len = req.cached_prompt_tokens
            req.block = torch.full((req.block_size,), self.mask_id, device=self.device, dtype=torch.long)
            req.masks_left = req.block_size
            req.phase = Phase.DENOISE
            self.prefix_cache_hits += 1
            self.prefix_cached_tokens += n

    def _graph_sized(self, group: list[Request]) -> list[list[Request]]:
        """A group larger than the largest graph bucket, as chunks that each replay a graph: its forward
        would otherwise run eagerly (0.35-0.6x the graphed step on an H100, see the README). Chunks of
        the largest bucket first, so that only the last one pads rows. Groups that run eagerly anyway
        (PREFILL, recomputing cache policies, smoothing) stay one forward."""
        top = GraphedForward.max_rows()
        if (self.graphs is None or len(group) <= top or group[0].phase is Phase.PREFILL
                or any(r.config.cache_policy != "dllm-var" or r.config.smoothing for r in group)):
            return [group]
        return [group[i:i + top] for i in range(0, len(group), top)]

    def _run_group(self, reqs: list[Request]) -> None:
        phase, b = reqs[0].phase, reqs[0].block_size
        if phase is Phase.REBUILD:
            return self._rebuild(reqs)
        n = len(reqs)
        dev = self.device
        plans = [r.recomputed() for r in reqs]  # (cache offset, committed tokens recomputed first)
        offsets = [offset for offset, _ in plans]
        lead = reqs[0].finished_block_len  # the query layout of Request.query_len, from plans computed once
        starts = [len(tokens) + lead for _, tokens in plans]  # where the decoded block sits in each query
        q_lens = [start + b for start in starts]
        if phase is Phase.DENOISE:
            current = torch.stack([r.block for r in reqs])
        else:
            current = torch.full((b,), self.mask_id, device=dev, dtype=torch.long).expand(n, b)
        finished = torch.stack([r.block for r in reqs]) if phase is Phase.COMMIT else None
        uniform = all(not tokens for _, tokens in plans)  # DENOISE / COMMIT of the dllm-var policy: B or 2B tokens
        if uniform:
            ids = current if finished is None else torch.cat([finished, current], dim=1)
            block_pos = None  # positions lead .. lead + B of every row, made where an eager decode needs them
        else:  # rows of different lengths (prefill, recomputing policies): right-padded with masks
            ids = torch.full((n, max(q_lens)), self.mask_id, dtype=torch.long, device=dev)
            for i, (_, tokens) in enumerate(plans):
                if tokens:
                    ids[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                if finished is not None:
                    ids[i, len(tokens):len(tokens) + b] = finished[i]
                ids[i, starts[i]:starts[i] + b] = current[i]
            block_pos = torch.tensor(starts, device=dev)[:, None] + torch.arange(b, device=dev)

        # DENOISE steps can be unrolled: k forwards + decodes back to back, one host sync at the end
        # (decoders are branch-free: a finished block just stays finished). k from the masks left.
        k = 1
        if phase is Phase.DENOISE and self.max_unroll > 1:
            fewest = min(r.masks_left for r in reqs)
            k = max(1, min(self.max_unroll, int(fewest // self.expected_tpf)))
        slots = [r.slot for r in reqs]
        smoothing = [i for i, r in enumerate(reqs) if r.config.smoothing]
        graphable = self.graphs is not None and uniform and phase is not Phase.PREFILL and not smoothing
        stepped = None
        if graphable and self.decode_graphs and all(_decodes_in_graph(r) for r in reqs):
            stepped = self._graphed_steps(reqs, ids, slots, offsets, lead, b, k)
        if stepped is not None:
            blocks = stepped[:, :b].clone()  # the graph's output is overwritten by its next replay
            done, masks_left = self._read_status(stepped[:, b:].t())
            self.total_forwards += k
            for i, r in enumerate(reqs):
                r.block = blocks[i]
                r.num_forwards += k
                r.block_steps += k
                r.steps += k
        else:
            done, masks_left = self._decode_steps(reqs, ids, current, block_pos, slots, offsets, q_lens, lead, b, k,
                                                  graphable, smoothing)
        for i, r in enumerate(reqs):
            r.masks_left = masks_left[i]
            if phase is Phase.PREFILL:
                r.cached_len = len(r.prompt_ids)
                r.prefill_source = None
                if self.scheduler.reuses_prompt(r):
                    self.cache.remember(r.prompt_key, r.slot, r.cached_len)
            elif phase is Phase.COMMIT:
                r.cached_len += b
            r.phase = Phase.DENOISE
            if done[i]:
                self._complete_block(r)
        settling = [r for i, r in enumerate(reqs) if not done[i] and r.streams_settled]
        if settling:
            self._emit_settled(settling)

    def _emit_settled(self, reqs: list[Request]) -> None:
        """GenerationConfig.stream_settled: emit each block's settled prefix (left of its first mask, before any
        stop token) where it grew; committed positions never change, so the block's end emits the rest."""
        blocks = torch.stack([r.block for r in reqs]).tolist()  # after the group's sync: a copy, no stall
        self.host_syncs += 1
        for r, block in zip(reqs, blocks):
            settled = block[:block.index(self.mask_id)] if self.mask_id in block else block
            stop_at = r.first_stop(settled)
            settled = settled[:min(len(settled) if stop_at is None else stop_at, r.max_new_tokens - len(r.generated))]
            if len(r.generated) + len(settled) > r.emitted_tokens:
                self._emit(r, settled=settled)

    def _graphed_steps(self, reqs: list[Request], ids: torch.Tensor, slots: list[int], offsets: list[int],
                       lead: int, b: int, k: int) -> torch.Tensor | None:
        """k forwards of a group of greedy rows, each with its decode step, as graph replays
        (GraphedForward.run_steps); [n, B + 2]: new blocks, finished, masks left. None: no graph fits."""
        kinds = tuple(sorted({r.config.decoder for r in reqs}))
        width = GraphedForward.stop_width(max(len(r.stop_ids) for r in reqs))
        if width is None:
            return None
        rows = []
        for r in reqs:
            if r.graph_row is None or r.graph_row[:2] != (kinds, width):
                r.graph_row = (kinds, width, decoders.greedy_row(r.config, r.stop_ids, kinds, width))
            rows.append(r.graph_row[2])
        return self.graphs.run_steps(ids, slots, offsets, logits_start=lead, n_logits=b, rows=rows, kinds=kinds,
                                     steps=k)

    def _decode_steps(self, reqs: list[Request], ids: torch.Tensor, blocks: torch.Tensor, block_pos: torch.Tensor,
                      slots: list[int], offsets: list[int], q_lens: list[int], lead: int, b: int, k: int,
                      graphable: bool, smoothing: list[int]) -> tuple[list[bool], list[int]]:
        """k forwards of a group (replayed graphs where `graphable`, else eager), each followed by the
        eager decode of every row's block (`blocks`: the current ones, or B masks for a new block);
        returns the blocks' status (the group's one host sync)."""
        phase = reqs[0].phase
        if block_pos is None:
            block_pos = torch.arange(lead, lead + b, device=self.device).expand(len(reqs), b)
        params = _DecodeParams(self, reqs, k)
        shared = _SharedPrefill.find(self, reqs) if phase is Phase.PREFILL and self.share_prefills else None
        view = None
        for u in range(k):
            logits = self.graphs.run(ids, slots, offsets, logits_start=lead, n_logits=b) if graphable else None
            if shared is not None:  # PREFILL: one step, nothing unrolled
                logits = self._shared_prefill_logits(reqs, ids, block_pos, offsets, q_lens, shared)
            elif logits is None:  # eager (or no graph bucket fits): one view serves every unrolled step
                if view is None:
                    view = self.cache.view(slots, offsets, q_lens, ids.shape[1])
                logits = self._eager_logits(reqs, ids, smoothing, block_pos, view)
            self.total_forwards += 1
            new_blocks = self._decode(logits, blocks, reqs, params, u)
            self._record_reveals(reqs, blocks, new_blocks)
            for i, r in enumerate(reqs):
                r.block = new_blocks[i]
                r.num_forwards += 1
                r.block_steps += 1
                r.steps += 1
            blocks = new_blocks
            if k > 1:
                ids = ids.scatter(1, block_pos, new_blocks)  # the next unrolled step sees the new block
        return self._block_status(blocks, params)  # the one host sync per forward group

    def _rebuild(self, reqs: list[Request]) -> None:
        """One forward that writes committed K/V again for requests resumed after a recompute preemption
        (Request.rebuild_query: the tokens that first wrote them, then B masks). Nothing is decoded: the
        requests' blocks, generators and counters stay as they were, and no logits are read. A group of
        committed blocks is shaped like a COMMIT forward (block + B masks at the block's offset): it
        replays that forward's CUDA graph where there is one."""
        b, dev = reqs[0].block_size, self.device
        plans = [r.rebuild_query() for r in reqs]
        q_lens = [len(tokens) + b for _, tokens in plans]
        slots, offsets = [r.slot for r in reqs], [offset for offset, _ in plans]
        ids = torch.full((len(reqs), max(q_lens)), self.mask_id, dtype=torch.long)
        for i, (_, tokens) in enumerate(plans):
            ids[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        ids = ids.to(dev)
        replayed = None
        if self.graphs is not None and all(q == 2 * b for q in q_lens):
            replayed = self.graphs.run(ids, slots, offsets, logits_start=b, n_logits=b)
        if replayed is None:
            view = self.cache.view(slots, offsets, q_lens, ids.shape[1])
            self.model(ids, cache=view, logits_index=torch.zeros((len(reqs), 1), dtype=torch.long, device=dev))
        self.total_forwards += 1
        for r, (offset, tokens) in zip(reqs, plans):
            r.rebuilt = offset + len(tokens)
            self.rebuilt_tokens += len(tokens)
            if offset == 0 and self.scheduler.reuses_prompt(r):  # the prompt's prefill, as at admission
                self.cache.remember(r.prompt_key, r.slot, len(r.prompt_ids))
            self.scheduler.rebuilt(r)

    def _shared_prefill_logits(self, reqs: list[Request], ids: torch.Tensor, block_pos: torch.Tensor,
                               offsets: list[int], q_lens: list[int], shared: _SharedPrefill) -> torch.Tensor:
        """Block logits [n, B, vocab] of a PREFILL group from one forward per distinct prompt; the rows
        that repeat a prompt get its K/V copied into their slots and its logits."""
        rows = shared.rows
        view = self.cache.view([reqs[i].slot for i in rows], [offsets[i] for i in rows], [q_lens[i] for i in rows],
                               ids.shape[1])
        logits = self._eager_logits([reqs[i] for i in rows], ids[shared.rows_index], [],
                                    block_pos[shared.rows_index], view)
        if shared.from_pages is not None:
            self.cache.copy_pages(shared.from_pages, shared.to_pages)
        self.shared_prefills += shared.saved
        return logits.index_select(0, shared.expand)

    def _eager_logits(self, reqs, ids, smoothing: list[int], block_pos, view) -> torch.Tensor:
        """Block logits [n, B, vocab] of one eager forward against the cache `view`."""
        if smoothing:
            embeds = self._smoothed_embeddings(ids, reqs, smoothing, block_pos)
            return self.model(inputs_embeds=embeds, cache=view, logits_index=block_pos)
        return self.model(ids, cache=view, logits_index=block_pos)

    def _record_reveals(self, reqs: list[Request], before: torch.Tensor, after: torch.Tensor) -> None:
        """record_trajectory: note the step at which each newly committed position was revealed."""
        rows = [i for i, r in enumerate(reqs) if r.config.record_trajectory]
        if not rows:
            return
        revealed = ((before != after) & (before == self.mask_id))[rows].tolist()
        for i, row in zip(rows, revealed):
            r = reqs[i]
            if r.block_steps == 0:
                r.reveal_step = [-1] * len(row)
            for j, new in enumerate(row):
                if new:
                    r.reveal_step[j] = r.block_steps

    def _block_status(self, blocks: torch.Tensor, params: _DecodeParams) -> tuple[list[bool], list[int]]:
        """Per request: is the block finished, and how many masks it has left (one device->host copy)."""
        done = self._finished_blocks(blocks, params)
        left = (blocks == self.mask_id).sum(1)
        return self._read_status(torch.stack([done.long(), left]))

    def _read_status(self, status: torch.Tensor) -> tuple[list[bool], list[int]]:
        """[2, n] (finished, masks left) to the host: the one device->host copy of a forward group."""
        done, left = status.tolist()
        self.host_syncs += 1
        return [bool(d) for d in done], left

    def _finished_blocks(self, blocks: torch.Tensor, params: _DecodeParams) -> torch.Tensor:
        """[n] bool: the block has no mask left, or (early_stop) a committed stop token with no mask before it."""
        return decoders.block_finished(blocks, self.mask_id, params.stop_ids, params.early)

    def _smoothed_embeddings(self, ids: torch.Tensor, reqs: list[Request], rows: list[int],
                             block_pos: torch.Tensor) -> torch.Tensor:
        """Iteration smoothing: masked block inputs = mask embedding + alpha_t * E[embedding]."""
        embeds = self.model.embed(ids)
        for i in rows:
            r = reqs[i]
            if r.phase is not Phase.DENOISE or r.smooth_delta is None:
                continue  # a fresh block has no previous-step distribution yet
            a0, growth, a_max = r.config.smoothing_alpha
            alpha = min(a0 + growth * r.steps, a_max)
            masked = (r.block == self.mask_id)[:, None]
            pos = block_pos[i]
            embeds[i, pos] = embeds[i, pos] + alpha * r.smooth_delta * masked
        return embeds

    def _decode(self, logits: torch.Tensor, blocks: torch.Tensor, reqs: list[Request], params: _DecodeParams,
                unrolled_step: int) -> torch.Tensor:
        """Apply each request's decoder to its block; returns the new blocks [n, B]. Launches device
        work only: every per-request parameter is already on the device (`params`)."""
        b = blocks.shape[1]
        dev = self.device
        masked = blocks == self.mask_id
        logits = raw_logits = logits.float()  # raw: the model's distribution, before bias and credit fusion
        if params.bias_index is not None:
            idx = params.bias_index
            biased = decoders.add_logit_bias(logits[idx], params.bias_ids, params.bias_values)
            logits = logits.index_copy(0, idx, biased)
        if params.allowed_index is not None:
            idx = params.allowed_index
            logits = logits.index_copy(0, idx, decoders.only_allowed(logits[idx], params.allowed))

        counts = None
        if params.penalty_rows:
            rows, idx = params.penalty_rows, params.penalty_index
            counts = torch.stack([reqs[i].output_counts for i in rows])
            seen = torch.stack([reqs[i].in_prompt for i in rows]) | (counts > 0)
            columns = torch.cat([params.penalty_columns, blocks[idx]], 1)  # every token seen so far, and more
            where = (idx[:, None, None], torch.arange(b, device=dev)[None, :, None], columns[:, None, :])
            penalised = decoders.apply_penalties(logits[where], counts.gather(1, columns), seen.gather(1, columns),
                                                 *params.penalties)
            logits = logits.index_put(where, penalised)  # a token listed twice gets the same value twice

        if params.credit_rows:
            idx, rows = params.credit_index, params.credit_rows
            state = torch.stack([reqs[i].credit if reqs[i].credit is not None and reqs[i].block_steps > 0
                                 else torch.zeros_like(logits[i]) for i in rows])
            first = params.credit_first if unrolled_step == 0 else torch.zeros_like(params.credit_first)
            fused, state = decoders.credit_fuse(logits[idx], state, masked[idx], *params.credit_abg, first_step=first)
            logits = logits.index_copy(0, idx, fused)
            for j, i in enumerate(rows):
                reqs[i].credit = state[j]

        if params.min_tokens_index is not None:
            idx = params.min_tokens_index
            logits = logits.index_copy(0, idx, decoders.forbid_early(logits[idx], params.min_tokens_limit,
                                                                     params.stop_ids[idx]))

        if params.sampled_index is not None:
            uniform = torch.stack([torch.rand(b, generator=reqs[i].generator, device=dev) for i in params.sampled_rows])
            floor = None
            if params.narrowed_index is not None:
                idx = params.narrowed_index
                narrowed = decoders.sampling_floor(decoders.without_mask(logits[idx], self.mask_id), *params.narrowing,
                                                   ranked=params.ranked, nucleus=params.nucleus,
                                                   open_nucleus=params.open_nucleus)
                self.host_syncs += params.nucleus_syncs
                floor = torch.full((len(params.sampled_rows), b), float("-inf"), device=dev).index_copy(
                    0, params.narrowed_among_sampled, narrowed)
            x, conf = decoders.candidates(logits, self.mask_id, params.sampled_index, params.temperatures, uniform, floor)
        else:
            x, conf = decoders.candidates(logits, self.mask_id)

        thresholds = params.thresholds[unrolled_step]
        allowed = masked  # the positions the decoders may commit
        if params.stops_last_index is not None:
            idx = params.stops_last_index
            # Positions at or above the threshold are committed in this step (COMMIT_ABOVE_THRESHOLD decoders).
            sure = torch.where(params.commits_above_threshold, thresholds[idx], 2.0)
            allowed = masked.index_copy(0, idx, decoders.stops_last(x[idx], conf[idx], masked[idx],
                                                                    params.stop_ids[idx], sure))
        commit = torch.zeros_like(masked)
        for kind, idx, param in params.kinds:
            commit[idx] = decoders.commit_rule(kind, conf[idx], allowed[idx], thresholds[idx], param)
        if params.json_index is not None:
            x, commit = self._json_decode(logits, blocks, x, commit, reqs, params, unrolled_step)

        new_blocks = torch.where(commit, x, blocks)
        if counts is not None:  # the penalties' output counts, stop tokens aside
            idx = params.penalty_index
            counted = commit[idx] & ~decoders.is_stop(x[idx], params.stop_ids[idx])
            counts = counts.scatter_add(1, x[idx], counted.to(counts.dtype))
            for j, i in enumerate(params.penalty_rows):
                reqs[i].output_counts = counts[j]
        if params.logprob_rows:
            self._record_logprobs(raw_logits, x, commit, reqs, params)
        for i, r in enumerate(reqs):
            if r.config.smoothing:
                r.smooth_delta = decoders.soft_embedding(logits[i:i + 1], self.model.embedding_weight)[0]
        return new_blocks

    def _json_decode(self, logits: torch.Tensor, blocks: torch.Tensor, x: torch.Tensor, commit: torch.Tensor,
                     reqs: list[Request], params: _DecodeParams, unrolled_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """JSON-mode rows (json_mode.block_step): their candidates and commits, chosen on the host from each
        position's most likely tokens (one host read for the group's JSON rows, one more per position where
        none of them fits)."""
        idx, rows, dev = params.json_index, params.json_rows, self.device
        vocab = self.json_vocabulary()
        probs = torch.softmax(decoders.without_mask(logits[idx], self.mask_id), dim=-1)
        top_probs, top_ids = probs.topk(min(json_mode.JSON_CANDIDATES, probs.shape[-1]), dim=-1)
        b = blocks.shape[1]
        uniforms = [torch.rand(b, generator=reqs[i].generator, device=dev) if reqs[i].config.temperature > 0
                    else torch.zeros(b, device=dev) for i in rows]
        host = [blocks[idx].tolist(), top_ids.tolist(), top_probs.tolist(), torch.stack(uniforms).tolist()]
        self.host_syncs += 1
        new_x, new_commit = [[0] * b for _ in rows], [[False] * b for _ in rows]
        for j, i in enumerate(rows):
            r, c = reqs[i], reqs[i].config

            def rank_all(pos: int, j: int = j) -> tuple[list[int], list[float]]:
                p, order = probs[j, pos].sort(descending=True)
                self.host_syncs += 1
                return order.tolist(), p.tolist()

            picker = json_mode.Picker(c.temperature, c.top_k, c.top_p, c.min_p)
            chosen = json_mode.block_step(r.json_start, host[0][j], self.mask_id, self.config.eos_token_id, vocab,
                                          host[1][j], host[2][j], float(params.host_thresholds[unrolled_step][i]),
                                          picker, host[3][j], rank_all)
            for pos, token in chosen.items():
                new_x[j][pos], new_commit[j][pos] = token, True
        committed = torch.tensor(new_commit, dtype=torch.bool, device=dev)
        tokens = torch.where(committed, torch.tensor(new_x, dtype=x.dtype, device=dev), x[idx])
        return x.index_copy(0, idx, tokens), commit.index_copy(0, idx, committed)

    def json_vocabulary(self) -> list[bytes | None]:
        """Each token's bytes for JSON mode, read off the tokenizer once (and checked to hold '{' and '}'); a
        ValueError that says why where this engine's vocabulary cannot write JSON."""
        if self._json_vocab is None and self._json_refusal is None:
            try:
                if self.tokenizer is None:
                    raise ValueError("JSON mode (response_format json_object / json_schema) needs an Engine with a "
                                     "tokenizer (tokens are checked as text)")
                self._json_vocab = json_mode.json_vocabulary(self.tokenizer, self.config.embedding_size)
            except ValueError as e:
                self._json_refusal = str(e)
        if self._json_refusal is not None:
            raise ValueError(self._json_refusal)
        return self._json_vocab

    def _record_logprobs(self, logits: torch.Tensor, x: torch.Tensor, commit: torch.Tensor, reqs: list[Request],
                         params: _DecodeParams) -> None:
        """GenerationConfig.logprobs: keep, at each position committed in this step, the model's
        log-probabilities there (on the device; the block's end reads them with its tokens)."""
        idx = params.logprob_index
        lp = torch.log_softmax(decoders.without_mask(logits[idx], self.mask_id), dim=-1)
        chosen = lp.gather(-1, x[idx, :, None]).squeeze(-1)
        top_lp, top_ids = lp.topk(params.top_logprobs, dim=-1)
        committed = commit[idx]
        for j, i in enumerate(params.logprob_rows):
            r = reqs[i]
            k = r.config.logprobs  # the group's top-k may hold more alternatives than this request asked for
            now = (chosen[j], top_lp[j, :, :k], top_ids[j, :, :k])
            before = r.block_logprobs or tuple(torch.zeros_like(t) for t in now)
            c = committed[j]
            r.block_logprobs = tuple(torch.where(c if t.dim() == 1 else c[:, None], t, old)
                                     for t, old in zip(now, before))

    def _threshold(self, r: Request, ahead: int = 0) -> float:
        """Commit threshold of `r`'s step `ahead` steps from now."""
        if r.config.smoothing:  # dInfer couples smoothing with a threshold decaying from 1.0 to tau
            return max(1.0 - r.config.smoothing_threshold_decay * (r.steps + ahead), r.config.threshold)
        return r.config.threshold

    # ----- block and request lifecycle -------------------------------------------------------

    def _complete_block(self, r: Request) -> None:
        tokens = r.block.tolist()
        if r.config.record_trajectory:
            r.trajectory = (r.trajectory or []) + [BlockTrajectory(tokens, list(r.reveal_step))]
        r.num_blocks += 1
        room = r.max_new_tokens - len(r.generated)
        stop_at = r.first_stop(tokens)
        stopped = stop_at is not None and stop_at <= room
        kept = tokens[:stop_at] if stopped else tokens[:room]
        r.generated.extend(kept)
        if r.json_start is not None and not stopped:  # JSON mode: the state the next block starts from
            r.json_start = r.json_start.feed(b"".join(self._json_vocab[t] for t in kept))
            if r.json_start is None:
                raise RuntimeError(f"JSON mode committed a block that is not a JSON prefix: {tokens}")
        if r.logprobs is not None:
            chosen, top_lp, top_ids = (t.tolist() for t in r.block_logprobs)
            r.logprobs.extend(TokenLogprob(t, chosen[j], list(zip(top_ids[j], top_lp[j]))) for j, t in enumerate(kept))
        # Stop strings apply either way: one may come before the stop token, in this same block.
        if (r.config.stop and self._apply_stop_strings(r)) or stopped:
            return self._finish(r, "stop")
        if len(r.generated) >= r.max_new_tokens:
            return self._finish(r, "length")
        # Next block.
        r.block_steps, r.credit, r.smooth_delta, r.block_logprobs = 0, None, None, None
        if r.config.commit_pass:
            r.phase = Phase.COMMIT  # r.block still holds the finished block for the commit forward
        else:
            r.cached_len += r.block_size  # keep the last denoise step's K/V as committed context
            r.block = torch.full((r.block_size,), self.mask_id, device=self.device, dtype=torch.long)
            r.phase = Phase.DENOISE
        self._emit(r)

    def _apply_stop_strings(self, r: Request) -> bool:
        """Cut the generation before the first stop string (after it, include_stop_str_in_output); True if one
        occurred. The tokens kept are those wholly inside the text kept."""
        text = self._text(r, r.generated)
        hits = [(i, s) for i, s in ((text.find(s), s) for s in r.config.stop) if i >= 0]
        if not hits:
            return False
        start, stop = min(hits, key=lambda hit: hit[0])  # the first listed of those starting first
        cut = start + len(stop) if r.config.include_stop_str_in_output else start
        r.final_text = text[:cut]
        k = len(r.generated)
        while k > 0 and len(self._text(r, r.generated[:k])) > cut:
            k -= 1
        r.final_ids = r.generated[:k]
        return True

    def _text(self, r: Request, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=r.config.skip_special_tokens)

    def _emit(self, r: Request, final: bool = False, settled: list[int] | None = None) -> None:
        """Queue the request's new tokens and text as a RequestOutput: those of its finished blocks (and
        `settled`, its current block's settled prefix), holding back text a stop string may still claim."""
        if final:
            text, ids = r.final_text, r.final_ids
        else:
            ids = r.generated + settled if settled else r.generated
            text = self._text(r, ids)
            hold = max((len(s) for s in r.config.stop or ()), default=1) - 1  # a stop string may be half-way
            while text.endswith("\ufffd") and hold < len(text):  # an incomplete multi-byte character
                hold += 1
            text = text[: len(text) - hold] if hold else text
        new_text = text[r.emitted_text:] if len(text) > r.emitted_text else ""
        new_ids = ids[r.emitted_tokens:] if len(ids) > r.emitted_tokens else []
        new_logprobs = r.logprobs[r.emitted_tokens:len(ids)] if r.logprobs is not None else None
        r.emitted_text = max(r.emitted_text, len(text))
        r.emitted_tokens = max(r.emitted_tokens, len(ids))
        generation = None
        if final:
            generation = Generation(r.request_id, list(ids), text, r.finish_reason, r.num_forwards, r.num_blocks,
                                    len(r.prompt_ids), r.trajectory,
                                    r.logprobs[:len(ids)] if r.logprobs is not None else None,
                                    cached_prompt_tokens=r.cached_prompt_tokens)
        if new_ids or new_text or final:
            self._outputs.append(RequestOutput(r.request_id, new_ids, new_text, final, generation, new_logprobs))

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        if r.final_ids is None:
            r.final_ids = list(r.generated)
            r.final_text = self._text(r, r.final_ids)
        self.scheduler.finish(r)
        r.block = r.credit = r.smooth_delta = r.block_logprobs = r.output_counts = r.in_prompt = None
        r.history_tokens = None
        self._emit(r, final=True)
        del self._requests[r.request_id]
