"""Sizing the K/V pool from the GPU's memory (`Engine(gpu_memory_utilization=)`, vLLM's knob).

The pool gets what is left of `utilization x total` once everything else is counted:
- what the device already holds that torch did not allocate (CUDA context, libraries, other processes),
- the weights (torch memory in use when the engine is built),
- the peak of a probe: a throwaway engine with a small pool runs the largest forwards this engine will
  run, at the engine's max_block_size B: the CUDA graphs of every batch bucket for B, a full prefill
  forward (`max_prefill_tokens`, or one `max_model_len` prompt), and `max_batch_size` requests decoded
  together with the largest decoder working set (top-p sampling ranking the whole vocabulary at every
  block position, as served requests do where their nucleus is wide, plus logprobs), once eagerly and then through the graphs. Its peak of reserved torch
  memory, less its own pool, is the room set aside for activations, logits work and graph memory pools.

Measured, not estimated: what the probe ran is covered, which is why the engine refuses blocks larger
than B and keeps graphs for the block sizes of its warm-up only (one size is what the probe covers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..config import LLaDAConfig
from .config import MAX_LOGPROBS, GenerationConfig

GiB = 1 << 30


def kv_bytes_per_token(config: LLaDAConfig, dtype: torch.dtype) -> int:
    """K and V of every layer for one cache position (LLaDA-8B in bf16: 512 KiB)."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class MemoryPlan:
    """How `gpu_memory_utilization` became a pool size (bytes; Engine.memory_plan, in stats())."""

    total: int  # the GPU's memory
    utilization: float
    other: int  # in use on the device outside torch: CUDA context, libraries, other processes
    weights: int  # torch memory in use when the engine was built
    activations: int  # the probe's peak of reserved torch memory beyond the weights and its pool
    bytes_per_token: int
    page_size: int
    pool_tokens: int

    @property
    def pool_bytes(self) -> int:
        return self.pool_tokens * self.bytes_per_token

    def as_dict(self) -> dict:
        return {**asdict(self), "pool_bytes": self.pool_bytes}

    def __str__(self) -> str:
        return (f"K/V pool {self.pool_tokens} tokens ({self.pool_bytes / GiB:.2f} GiB) = {self.utilization:g} x "
                f"{self.total / GiB:.2f} GiB - other {self.other / GiB:.2f} GiB - weights {self.weights / GiB:.2f} "
                f"GiB - activations {self.activations / GiB:.2f} GiB")


def plan_pool(*, total: int, utilization: float, other: int, weights: int, activations: int,
              bytes_per_token: int, page_size: int, min_tokens: int) -> MemoryPlan:
    """The largest whole number of pages that fits the budget; a clear error below `min_tokens` (the
    positions one request of max_model_len needs)."""
    budget = int(utilization * total) - other - weights - activations
    pool_tokens = max(budget, 0) // bytes_per_token // page_size * page_size
    plan = MemoryPlan(total, utilization, other, weights, activations, bytes_per_token, page_size, pool_tokens)
    if pool_tokens < min_tokens:
        raise ValueError(
            f"gpu_memory_utilization={utilization:g} leaves room for {pool_tokens} K/V cache tokens "
            f"({plan}), but one request of max_model_len needs {min_tokens}: raise gpu_memory_utilization, "
            f"lower max_model_len, max_batch_size or max_prefill_tokens, or set kv_cache_tokens")
    return plan


@dataclass(frozen=True)
class ProbeLoad:
    """The requests a memory probe runs: `long_prompts` prompts of `long_prompt_len` tokens (filling one
    prefill forward), then `max_batch_size` one-token prompts decoded `blocks` blocks each, together."""

    block_size: int
    long_prompts: int
    long_prompt_len: int
    batch: int
    blocks: int

    def pool_tokens(self, page_size: int) -> int:
        """Positions the probe's pool needs: every request at once, each rounded up to whole pages."""
        pages = lambda positions: -(-positions // page_size)  # noqa: E731
        return page_size * max(self.long_prompts * pages(self.long_prompt_len + self.block_size),
                               self.batch * pages(1 + self.blocks * self.block_size))

    def config(self, blocks: int, seed: int) -> GenerationConfig:
        # Whole blocks in one step (few forwards), every row sampling with top_p: the sort of the
        # vocabulary at every block position is the decoders' largest working set; logprobs add theirs.
        return GenerationConfig(block_size=self.block_size, max_new_tokens=blocks * self.block_size,
                                decoder="fixed_k", tokens_per_step=self.block_size, temperature=1.0, top_p=0.9,
                                logprobs=MAX_LOGPROBS, ignore_eos=True, seed=seed)


def probe_load(block_size: int, max_batch_size: int, max_model_len: int, max_prefill_tokens: int) -> ProbeLoad:
    if 1 + block_size > max_model_len:
        raise ValueError(f"the memory profile's block size {block_size} does not fit max_model_len={max_model_len} "
                         f"with a prompt")
    # The scheduler fills a prefill forward up to max_prefill_tokens, or runs one prompt alone above it.
    long_prompts = max(1, max_prefill_tokens // max_model_len)
    blocks = 2 if 1 + 2 * block_size <= max_model_len else 1  # two: a COMMIT forward [rows, 2B] too
    return ProbeLoad(block_size, long_prompts, max_model_len - block_size, max_batch_size, blocks)


def run_probe(engine, load: ProbeLoad, seed: int = 0) -> None:
    """Run the probe's requests on `engine` to the end (an engine with share_prefills and
    prefix_caching off, so that every row runs)."""
    generator = torch.Generator().manual_seed(seed)
    cfg = engine.config
    special = {cfg.mask_token_id, *engine.base_stop_ids}  # the config's stop ids and the tokenizer's EOT
    ordinary = torch.tensor([t for t in range(min(cfg.vocab_size, 4096)) if t not in special])

    def prompt(n: int) -> list[int]:
        return ordinary[torch.randint(len(ordinary), (n,), generator=generator)].tolist()

    for count, length, blocks in ((load.long_prompts, load.long_prompt_len, 1), (load.batch, 1, load.blocks)):
        for i in range(count):
            engine.add_request(prompt(length), load.config(blocks, seed + i))
        while engine.has_unfinished():
            engine.step()
