"""CUDA graphs of the engine's fixed-shape forwards.

A DENOISE forward is always [rows, B] and a COMMIT forward [rows, 2B]; only the cache grows. With
the pool-attention kernel (`dllm.kernels.pool_attention`) nothing in the forward depends on the
cache length on the host, so one graph per (row bucket, query length, logits window) serves the
whole generation: a replay costs one launch instead of ~15 per layer.

Rows are padded up to a bucket (1, 2, 4, ..., 64). Padding rows point at a scratch slot of the
pool, whose page-table row maps only a page no request owns, so whatever they write is harmless.
The page table is read at every replay, so pages handed to a request between steps need no new
capture. Graphs are captured lazily, the first time a shape is used, into one shared memory pool.

Each graph keeps its logits [rows, B, vocab] alive, so graphs of many block sizes add up (a server
whose clients choose their own block sizes would grow without bound). `only(block_sizes)` (what
Engine.warmup declares) keeps the graphs of those block sizes: the others are dropped, their memory
returns to the pool, and forwards of other block sizes run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import CacheView, LLaDAModelLM
from .kv_cache import KVCache

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def capture(fn, pool=None) -> tuple[torch.cuda.CUDAGraph, object]:
    """A CUDA graph of fn() and what the captured call returned. Two warm-up calls on a side stream
    first, so kernel compilation and library handles stay out of the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None  # set by capture()
    ids: torch.Tensor  # [rows, q] static inputs...
    slots: torch.Tensor  # [rows]
    offsets: torch.Tensor  # [rows]
    logits_index: torch.Tensor  # [rows, n_logits]: the graph reads it at every replay, so it lives here
    logits: torch.Tensor  # [rows, n_logits, vocab] static output


class GraphedForward:
    """Replays captured forwards for DENOISE / COMMIT groups; `None` from `run` means: run eagerly."""

    def __init__(self, model: LLaDAModelLM, cache: KVCache, mask_token_id: int) -> None:
        if not model.use_pool_kernel:
            raise ValueError("CUDA graphs need the pool-attention kernel (triton on CUDA); see enable_pool_kernel")
        if cache.scratch_slot is None:
            raise ValueError("CUDA graphs need a KV cache with a scratch slot for their padding rows")
        self.model = model
        self.cache = cache
        self.scratch_slot = cache.scratch_slot
        self.mask_token_id = mask_token_id
        self.capacity = cache.pages_per_slot * cache.page_size
        self.device = cache.k.device
        self.mempool = None  # the memory pool every graph shares, made at the first capture
        self.graphs: dict[tuple[int, int, int, int], _Graph] = {}
        self.block_sizes: frozenset[int] | None = None  # None: graphs of any block size (see only())
        self.replays = 0
        self._last_meta: dict[tuple, tuple] = {}

    @staticmethod
    def supported(model: LLaDAModelLM, device: torch.device) -> bool:
        """Graphs of the engine's forwards need a CUDA device and the pool-attention kernel (without it
        an attention's shapes follow the cache length, which a graph cannot)."""
        return device.type == "cuda" and model.use_pool_kernel

    @staticmethod
    def bucket(rows: int) -> int | None:
        return next((b for b in ROW_BUCKETS if b >= rows), None)

    def run(self, ids: torch.Tensor, slots: list[int], offsets: list[int], logits_start: int,
            n_logits: int) -> torch.Tensor | None:
        """Logits [rows, n_logits, vocab] of positions [logits_start, +n_logits) of each row's
        query ids [rows, q] written at `offsets` of `slots`; None if no bucket fits."""
        rows, q_len = ids.shape
        bucket = self.bucket(rows)
        if bucket is None or max(offsets) + q_len > self.capacity:
            return None
        if self.block_sizes is not None and n_logits not in self.block_sizes:
            return None
        key = (bucket, q_len, logits_start, n_logits)
        g = self.graphs.get(key) or self._capture(*key)
        g.ids[:rows].copy_(ids)
        pad = bucket - rows
        meta = (list(slots) + [self.scratch_slot] * pad, list(offsets) + [0] * pad)
        if self._last_meta.get(key) != meta:  # unchanged in unrolled steps: no host->device copy
            both = torch.tensor(meta)
            g.slots.copy_(both[0])
            g.offsets.copy_(both[1])
            self._last_meta[key] = meta
        g.graph.replay()
        self.replays += 1
        return g.logits[:rows]

    def only(self, block_sizes) -> None:
        """From now on, graphs of these block sizes only (a key's n_logits is its block size)."""
        self.block_sizes = frozenset(block_sizes)
        for key in [k for k in self.graphs if k[3] not in self.block_sizes]:
            del self.graphs[key]
            self._last_meta.pop(key, None)

    def capture_all(self, block_size: int, max_rows: int) -> int:
        """Capture the DENOISE and COMMIT graphs of every row bucket up to max_rows now, so that no
        capture (or compile) lands inside serving; returns how many graphs exist."""
        top = self.bucket(max_rows) or ROW_BUCKETS[-1]
        for rows in ROW_BUCKETS:
            if rows > top:
                break
            for key in ((rows, block_size, 0, block_size), (rows, 2 * block_size, block_size, block_size)):
                if key not in self.graphs:
                    self._capture(*key)
        return len(self.graphs)

    def _forward(self, g: _Graph) -> torch.Tensor:
        view = CacheView(self.cache.k, self.cache.v, self.cache.table, slots=g.slots, offsets=g.offsets,
                         window=self.capacity)
        return self.model(g.ids, cache=view, logits_index=g.logits_index)

    def _capture(self, rows: int, q_len: int, logits_start: int, n_logits: int) -> _Graph:
        dev = self.device
        g = _Graph(graph=None,
                   ids=torch.full((rows, q_len), self.mask_token_id, device=dev, dtype=torch.long),
                   slots=torch.full((rows,), self.scratch_slot, device=dev, dtype=torch.long),  # harmless while capturing
                   offsets=torch.zeros(rows, device=dev, dtype=torch.long),
                   logits_index=torch.arange(logits_start, logits_start + n_logits, device=dev).expand(rows, n_logits),
                   logits=None)
        if self.mempool is None:
            self.mempool = torch.cuda.graph_pool_handle()
        g.graph, g.logits = capture(lambda: self._forward(g), pool=self.mempool)
        self.graphs[(rows, q_len, logits_start, n_logits)] = g
        return g
