"""CUDA graphs of the engine's fixed-shape forwards.

A DENOISE forward is always [rows, B] and a COMMIT forward [rows, 2B]; only the cache grows. With
the pool-attention kernel (`dllm.kernels.pool_attention`) nothing in the forward depends on the
cache length on the host, so one graph per (row bucket, query length, logits window) serves the
whole generation: a replay costs one launch instead of ~15 per layer.

Rows are padded up to a bucket (1, 2, 4, ..., 64); the engine runs a larger group as chunks of 64
rows, a replay each. Padding rows point at a scratch slot of the
pool, whose page-table row maps only a page no request owns, so whatever they write is harmless.
The page table is read at every replay, so pages handed to a request between steps need no new
capture. Graphs are captured lazily, the first time a shape is used, into one shared memory pool.

A group whose rows all decode greedily with a stateless decoder (decoders.greedy_step) also replays
its decode step as a second graph on the forward graph's logits: a step is then two replays and one
read of the blocks' status, instead of the decoder's ~50 small launches. Its per-row parameters are
copied only when they change; unrolled DENOISE steps feed each new block to the next forward on the
device.

Each graph keeps its logits [rows, B, vocab] alive, so graphs of many block sizes add up (a server
whose clients choose their own block sizes would grow without bound). `only(block_sizes)` (what
Engine.warmup declares) keeps the graphs of those block sizes: the others are dropped, their memory
returns to the pool, and forwards of other block sizes run eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import CacheView, LLaDAModelLM
from . import decoders
from .kv_cache import KVCache

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
STOP_WIDTHS = (4, 8, 16, 32, 64)  # stop ids per row in a decode graph (padded with -1); more: eager


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


@dataclass
class _StepGraph:
    """A decode step (decoders.greedy_step) on a forward graph's logits, replayed after it."""

    graph: torch.cuda.CUDAGraph | None
    rows: torch.Tensor  # [rows, GREEDY_ROW_HEAD + stop width] float32 static input (decoders.greedy_row)
    out: torch.Tensor | None  # [rows, B + 2] long static output: new blocks, finished, masks left


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
        # decode graphs by (forward graph key, the rows' decoders, stop width)
        self.steps: dict[tuple[tuple[int, int, int, int], tuple[str, ...], int], _StepGraph] = {}
        self.block_sizes: frozenset[int] | None = None  # None: graphs of any block size (see only())
        self.replays = 0  # forward replays
        self.step_replays = 0  # decode-step replays
        self._last_meta: dict[tuple, tuple] = {}

    @staticmethod
    def supported(model: LLaDAModelLM, device: torch.device) -> bool:
        """Graphs of the engine's forwards need a CUDA device and the pool-attention kernel (without it
        an attention's shapes follow the cache length, which a graph cannot)."""
        return device.type == "cuda" and model.use_pool_kernel

    @staticmethod
    def bucket(rows: int) -> int | None:
        return next((b for b in ROW_BUCKETS if b >= rows), None)

    @staticmethod
    def max_rows() -> int:
        """The largest group one graph replays (Engine runs larger groups as chunks of this many)."""
        return ROW_BUCKETS[-1]

    @staticmethod
    def stop_width(stop_ids: int) -> int | None:
        return next((w for w in STOP_WIDTHS if w >= stop_ids), None)

    def run(self, ids: torch.Tensor, slots: list[int], offsets: list[int], logits_start: int,
            n_logits: int) -> torch.Tensor | None:
        """Logits [rows, n_logits, vocab] of positions [logits_start, +n_logits) of each row's
        query ids [rows, q] written at `offsets` of `slots`; None if no bucket fits."""
        key = self._key(ids, offsets, logits_start, n_logits)
        if key is None:
            return None
        g = self.graphs.get(key) or self._capture(*key)
        self._load(key, g, ids, slots, offsets)
        g.graph.replay()
        self.replays += 1
        return g.logits[:len(ids)]

    def run_steps(self, ids: torch.Tensor, slots: list[int], offsets: list[int], logits_start: int, n_logits: int,
                  rows: list[list[float]], kinds: tuple[str, ...], steps: int = 1) -> torch.Tensor | None:
        """`steps` forwards as `run`, each followed by the replayed decode step of its greedy rows
        (decoders.greedy_step with these `rows` and `kinds`); returns the last step's [rows, B + 2]
        (new blocks, finished, masks left), or None if no graph fits. Steps after the first (DENOISE
        forwards only: q_len == n_logits) read the block the step before decoded."""
        key = self._key(ids, offsets, logits_start, n_logits)
        width = len(rows[0]) - decoders.GREEDY_ROW_HEAD
        if key is None or width not in STOP_WIDTHS:
            return None
        if steps > 1 and (logits_start, ids.shape[1]) != (0, n_logits):
            raise ValueError(f"unrolled decode steps need DENOISE forwards (the query is the block), got a query "
                             f"of {ids.shape[1]} with the block at {logits_start}")
        g = self.graphs.get(key) or self._capture(*key)
        step_key = (key, kinds, width)
        sg = self.steps.get(step_key) or self._capture_step(g, *step_key)
        self._load(key, g, ids, slots, offsets)  # after every capture: a capture runs the decode, which writes g.ids
        padded = rows + [decoders.greedy_padding_row(width)] * (key[0] - len(rows))
        if self._last_meta.get(step_key) != padded:  # the same requests' rows: no host->device copy
            sg.rows.copy_(torch.tensor(padded))
            self._last_meta[step_key] = padded
        for _ in range(steps):
            g.graph.replay()
            sg.graph.replay()
        self.replays += steps
        self.step_replays += steps
        return sg.out[:len(ids)]

    def _key(self, ids: torch.Tensor, offsets: list[int], logits_start: int,
             n_logits: int) -> tuple[int, int, int, int] | None:
        """The graph of this forward's shape, or None: it runs eagerly."""
        rows, q_len = ids.shape
        bucket = self.bucket(rows)
        if bucket is None or max(offsets) + q_len > self.capacity:
            return None
        if self.block_sizes is not None and n_logits not in self.block_sizes:
            return None
        return bucket, q_len, logits_start, n_logits

    def _load(self, key, g: _Graph, ids: torch.Tensor, slots: list[int], offsets: list[int]) -> None:
        """Copy a group's inputs into a graph's static buffers (padding rows on the scratch slot)."""
        rows = len(ids)
        g.ids[:rows].copy_(ids)
        pad = key[0] - rows
        meta = (list(slots) + [self.scratch_slot] * pad, list(offsets) + [0] * pad)
        if self._last_meta.get(key) != meta:  # unchanged in unrolled steps: no host->device copy
            both = torch.tensor(meta)
            g.slots.copy_(both[0])
            g.offsets.copy_(both[1])
            self._last_meta[key] = meta

    def only(self, block_sizes) -> None:
        """From now on, graphs of these block sizes only (a key's n_logits is its block size)."""
        self.block_sizes = frozenset(block_sizes)
        for key in [k for k in self.graphs if k[3] not in self.block_sizes]:
            del self.graphs[key]
            self._last_meta.pop(key, None)
        for key in [k for k in self.steps if k[0][3] not in self.block_sizes]:
            del self.steps[key]
            self._last_meta.pop(key, None)

    def capture_all(self, block_size: int, max_rows: int, step_decoders: tuple[str, ...] = ()) -> int:
        """Capture the DENOISE and COMMIT graphs of every row bucket up to max_rows now, with the decode
        steps of groups that all use one of `step_decoders` (and at most STOP_WIDTHS[0] stop ids), so that
        no capture (or compile) lands inside serving; returns how many forward graphs exist."""
        top = self.bucket(max_rows) or self.max_rows()
        for rows in ROW_BUCKETS:
            if rows > top:
                break
            for key in ((rows, block_size, 0, block_size), (rows, 2 * block_size, block_size, block_size)):
                g = self.graphs.get(key) or self._capture(*key)
                for step_key in ((key, (d,), STOP_WIDTHS[0]) for d in step_decoders):
                    if step_key not in self.steps:
                        self._capture_step(g, *step_key)
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

    def _capture_step(self, g: _Graph, key: tuple[int, int, int, int], kinds: tuple[str, ...],
                      width: int) -> _StepGraph:
        rows, q_len, start, b = key
        unknown = set(kinds) - set(decoders.STATELESS)
        if unknown:
            raise ValueError(f"decode graphs run the decoders {decoders.STATELESS}, not {sorted(unknown)}")
        padding = torch.tensor([decoders.greedy_padding_row(width)] * rows, device=self.device)
        sg = _StepGraph(graph=None, rows=padding, out=None)
        feeds_next = start == 0 and q_len == b  # DENOISE: the next unrolled forward reads the new block

        def step() -> torch.Tensor:
            out = decoders.greedy_step(g.logits, g.ids[:, start:start + b], self.mask_token_id, sg.rows, kinds)
            if feeds_next:
                g.ids.copy_(out[:, :b])
            return out

        sg.graph, sg.out = capture(step, pool=self.mempool)
        self.steps[(key, kinds, width)] = sg
        return sg
