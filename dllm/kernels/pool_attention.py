"""Attention of a block of queries against each row's own cache positions in the paged K/V pool, in
one Triton kernel.

The engine keeps K/V in pages [n_pages, page_size, n_kv_heads, head_dim] per layer; a page table
[n_slots, pages_per_slot] lists each slot's pages in position order, and a batch row may use any
slot. The portable path (`gather + SDPA`) first copies every row's window of pages into a dense
tensor: at batch 1 against 2k cached tokens of an 8B model that copy moves twice the K/V bytes the
attention itself reads. This kernel reads K/V straight from the pages through the table and stops at
each row's kv_len, which lives on the device: the launch shape depends only on (rows, q_len, heads),
so it runs unchanged inside a CUDA graph while the cache grows.

Parallelism at batch 1 comes from splitting each row's keys into `splits` chunks (flash-decoding);
the partial results are merged with their log-sum-exp weights by the last chunk of each query block
to finish, in the same launch (or by a second kernel, `merge_in_kernel=False`).
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # triton is absent on the CPU machines unless installed for the interpreter
    triton = None


def available(device: torch.device | str) -> bool:
    """True where the kernel can run: CUDA with triton, or triton's CPU interpreter (tests)."""
    if triton is None:
        return False
    if torch.device(device).type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def supported_head_dim(head_dim: int) -> bool:
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


if triton is not None:

    @triton.jit
    def _pool_attention_kernel(
        Q, K, V, Table, Slots, KvLens, Out, MaxLog, SumExp, Final, Counters,
        stride_qn, stride_qm, stride_qh,
        stride_kp, stride_kt, stride_kh,
        stride_vp, stride_vt, stride_vh, stride_table,
        stride_on, stride_om, stride_oh, stride_os,
        stride_mn, stride_mh, stride_ms,
        stride_fn, stride_fm, stride_fh,
        q_len, n_heads, group, qk_scale_log2,
        SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        PAGE_SIZE: tl.constexpr, MERGE_IN_KERNEL: tl.constexpr,
    ):
        # One program: BLOCK_M queries of one (row, head), over one chunk of that row's keys. With
        # MERGE_IN_KERNEL the last chunk to finish merges all chunks into Final (no second kernel).
        pid_m = tl.program_id(0)
        pid_rh = tl.program_id(1)
        split = tl.program_id(2)
        row = pid_rh // n_heads
        head = pid_rh % n_heads
        kv_head = head // group
        slot = tl.load(Slots + row).to(tl.int64)
        kv_len = tl.load(KvLens + row)
        chunk = tl.cdiv(tl.cdiv(kv_len, SPLITS), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, kv_len)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + row * stride_qn + offs_m[:, None] * stride_qm + head * stride_qh + offs_d[None, :],
                    mask=offs_m[:, None] < q_len, other=0.0)
        pages = Table + slot * stride_table
        k_base = K + kv_head * stride_kh
        v_base = V + kv_head * stride_vh

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for t0 in range(start, end, BLOCK_N):
            offs_n = t0 + tl.arange(0, BLOCK_N)
            valid = offs_n < end
            page = tl.load(pages + offs_n // PAGE_SIZE, mask=valid, other=0).to(tl.int64)  # each key's page
            row_k = page * stride_kp + (offs_n % PAGE_SIZE) * stride_kt
            row_v = page * stride_vp + (offs_n % PAGE_SIZE) * stride_vt
            k = tl.load(k_base + row_k[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale_log2  # log2 domain: exp2 below
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + row_v[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        out_mask = offs_m[:, None] < q_len
        if SPLITS == 1:
            out = acc / l_i[:, None]
            tl.store(Out + row * stride_on + offs_m[:, None] * stride_om + head * stride_oh + offs_d[None, :],
                     out.to(Out.dtype.element_ty), mask=out_mask)
        else:
            tl.store(Out + row * stride_on + offs_m[:, None] * stride_om + head * stride_oh + split * stride_os
                     + offs_d[None, :], acc, mask=out_mask)
            stats = row * stride_mn + head * stride_mh + split * stride_ms + offs_m
            tl.store(MaxLog + stats, m_i, mask=offs_m < q_len)
            tl.store(SumExp + stats, l_i, mask=offs_m < q_len)
            if MERGE_IN_KERNEL:
                # Publish this chunk (every thread's stores, then a release), count it; the program
                # that counts the last chunk acquires the others' and merges.
                tl.debug_barrier()
                counter = Counters + pid_rh * tl.num_programs(0) + pid_m
                done = tl.atomic_add(counter, 1, sem="acq_rel")
                if done == SPLITS - 1:
                    row_m = offs_m < q_len
                    part = Out + row * stride_on + offs_m[:, None] * stride_om + head * stride_oh + offs_d[None, :]
                    stat = row * stride_mn + head * stride_mh + offs_m
                    m_all = tl.full([BLOCK_M], float("-inf"), tl.float32)
                    l_all = tl.zeros([BLOCK_M], tl.float32)
                    acc_all = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
                    for c in range(SPLITS):  # L2 reads (.cg): other SMs wrote these
                        m_c = tl.load(MaxLog + stat + c * stride_ms, mask=row_m, other=float("-inf"), cache_modifier=".cg")
                        l_c = tl.load(SumExp + stat + c * stride_ms, mask=row_m, other=0.0, cache_modifier=".cg")
                        a_c = tl.load(part + c * stride_os, mask=out_mask, other=0.0, cache_modifier=".cg")
                        m_new = tl.maximum(m_all, m_c)
                        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # chunks without keys weigh 0
                        w_all = tl.exp2(m_all - m_ref)
                        w_c = tl.exp2(m_c - m_ref)
                        l_all = l_all * w_all + l_c * w_c
                        acc_all = acc_all * w_all[:, None] + a_c * w_c[:, None]
                        m_all = m_new
                    out = acc_all / l_all[:, None]
                    tl.store(Final + row * stride_fn + offs_m[:, None] * stride_fm + head * stride_fh + offs_d[None, :],
                             out.to(Final.dtype.element_ty), mask=out_mask)
                    tl.atomic_xchg(counter, 0)  # zero again for the next launch (and graph replays)


# Launch defaults, from a sweep on an H100 (benchmarks.attention_bench: a 64-query block of LLaDA-8B's
# attention against 512 and 2048 cached keys, batch 1): 32 queries and 128 keys per program step, about
# two programs per SM, chunks merged in-kernel. 13.9 / 28.1 us per layer against 20.2 / 27.3 for the
# earlier 64 / 64 / 9 chunks with a merge kernel (and 15.1 / 34.2 for SDPA on dense K/V).
TARGET_PROGRAMS = 256


def choose_splits(rows: int, heads: int, q_len: int, capacity: int, block_m: int = 32, block_n: int = 128,
                  target_programs: int = TARGET_PROGRAMS) -> int:
    """Key chunks per (row, head): enough programs to fill the GPU (about 2 per SM of an H100),
    never more chunks than the slot has key blocks."""
    programs = rows * heads * math.ceil(q_len / block_m)
    return max(1, min(16, math.ceil(target_programs / programs), math.ceil(capacity / block_n)))


def default_block_m(q_len: int) -> int:
    return min(32, max(16, triton.next_power_of_2(q_len)))


def default_block_n(head_dim: int) -> int:
    return 128 if head_dim <= 128 else 64  # K and V tiles, double-buffered, within shared memory


_COUNTERS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _chunk_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (row, head, query block), kept across calls: each launch
    leaves them zero again, so a CUDA graph can replay launches that use them. One set per stream:
    launches on one stream run one after the other, launches on two streams could overlap."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    counters = _COUNTERS.get((device, stream))
    if counters is None or counters.numel() < n:
        counters = _COUNTERS[(device, stream)] = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
    return counters


def pool_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, page_table: torch.Tensor,
                   slots: torch.Tensor, kv_lens: torch.Tensor, splits: int | None = None, block_m: int | None = None,
                   block_n: int | None = None, merge_in_kernel: bool = True, merge=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v of every row against keys [0, kv_len) of its slot.

    q:          [n, q_len, n_heads, head_dim]
    k_pool:     [n_pages, page_size, n_kv_heads, head_dim] (one layer of the pool), v_pool alike
    page_table: [n_slots, pages_per_slot] int: key p of slot s is in page page_table[s, p // page_size]
    slots:      [n] int slot of each row; kv_lens: [n] int keys each row attends to (>= 1)
    block_m, block_n, splits: the launch (queries per program, keys per inner step, key chunks per
             row and head); chosen from the shapes when not given
    merge_in_kernel: the last chunk of each (row, head, query block) to finish merges them all, in
             the same kernel (one int32 counter per program group, zeroed again in-kernel); otherwise
             `merge` (default `merge_splits`) merges them in a second launch
    Returns [n, q_len, n_heads, head_dim] in q's dtype. No host sync.
    """
    n, q_len, n_heads, head_dim = q.shape
    n_kv_heads = k_pool.shape[2]
    if triton is None:
        raise RuntimeError("pool_attention needs triton (pip install triton); use the SDPA path instead")
    if not supported_head_dim(head_dim):
        raise ValueError(f"pool_attention supports power-of-two head_dim >= 16, got {head_dim}")
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("the K/V pool's head_dim axis must be contiguous")
    if page_table.stride(-1) != 1:
        raise ValueError("the page table's rows must be contiguous")
    page_size = k_pool.shape[1]
    q = q.contiguous()
    block_m = block_m or default_block_m(q_len)
    block_n = block_n or default_block_n(head_dim)
    splits = splits or choose_splits(n, n_heads, q_len, page_table.shape[1] * page_size, block_m, block_n)
    grid = (triton.cdiv(q_len, block_m), n * n_heads, splits)
    scale = 1.0 / math.sqrt(head_dim) * 1.4426950408889634  # log2(e): the kernel uses exp2
    if splits == 1:
        out = torch.empty_like(q)
        max_log = sum_exp = out  # unused
        o_strides = (out.stride(0), out.stride(1), out.stride(2), 0)
        m_strides = (0, 0, 0)
    else:
        out = torch.empty((n, q_len, n_heads, splits, head_dim), device=q.device, dtype=torch.float32)
        max_log = torch.empty((n, n_heads, splits, q_len), device=q.device, dtype=torch.float32)
        sum_exp = torch.empty_like(max_log)
        o_strides = (out.stride(0), out.stride(1), out.stride(2), out.stride(3))
        m_strides = (max_log.stride(0), max_log.stride(1), max_log.stride(2))
    merge_in_kernel = merge_in_kernel and splits > 1
    final = torch.empty_like(q) if merge_in_kernel else out
    counters = _chunk_counters(q.device, grid[0] * grid[1]) if merge_in_kernel else kv_lens  # else unused
    _pool_attention_kernel[grid](
        q, k_pool, v_pool, page_table, slots, kv_lens.to(torch.int32), out, max_log, sum_exp, final, counters,
        q.stride(0), q.stride(1), q.stride(2),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), page_table.stride(0),
        *o_strides, *m_strides,
        final.stride(0), final.stride(1), final.stride(2),
        q_len, n_heads, n_heads // n_kv_heads, scale,
        SPLITS=splits, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        MERGE_IN_KERNEL=merge_in_kernel,
        num_warps=4, num_stages=2,
    )
    if splits == 1:
        return out
    if merge_in_kernel:
        return final
    return (merge or merge_splits)(out, max_log, sum_exp, q.dtype)


def merge_splits(out: torch.Tensor, max_log: torch.Tensor, sum_exp: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Merge per-chunk results: out [n, q, H, S, d] (unnormalised), max_log / sum_exp [n, H, S, q]
    (log2 domain). Chunk weights are 2^(m_s - max m); chunks with no keys have m = -inf, weight 0."""
    top = max_log.amax(2, keepdim=True)
    w = torch.exp2(max_log - top)  # [n, H, S, q]
    denom = (sum_exp * w).sum(2)  # [n, H, q]
    w = w.permute(0, 3, 1, 2)[..., None]  # [n, q, H, S, 1]
    merged = (out * w).sum(3) / denom.permute(0, 2, 1)[..., None]
    return merged.to(dtype)
