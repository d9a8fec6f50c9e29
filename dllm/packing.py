"""Multi-sample packing (dLLM-Var): tokenised samples laid back to back into fixed-length rows.

Each sample is (prompt ids, response ids), the response already ending with EOS (or EOT).
Two modes:
- "concat" (the paper's): one running stream cut into rows of `seq_len`; samples may straddle
  rows; only the final row is padded. Every row but the last has no padding at all.
- "no_split": every sample stays inside one row; rows are filled best-fit-decreasing and the
  tail of each row is padded. Samples longer than `seq_len` cannot fit and are reported.
Each row carries `input_ids`, `prompt_mask` (True on prompt tokens: never noised, never in the
loss) and `segment_ids` (1, 2, ... per sample piece within the row; 0 on padding), which the
objective uses for padding, tail masking and the optional block-diagonal attention.

EOS padding (`eos_padded`) is applied to a sample before packing: its answer's EOS followed by a
random number of extra EOS tokens, drawn from the sample's name so that every run packs the same rows.
"""

from __future__ import annotations

import bisect
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

PACK_MODES = ("concat", "no_split")


@dataclass
class PackedRows:
    input_ids: np.ndarray  # int64 [rows, seq_len]
    prompt_mask: np.ndarray  # bool [rows, seq_len]
    segment_ids: np.ndarray  # int32 [rows, seq_len], 0 = padding
    dropped: list[int] = field(default_factory=list)  # indices of samples that could not be packed
    # concat mode with keep_tail: the unfinished end of the stream as (prompt, response) pieces,
    # to be packed again with other batches' tails so that only the very last row is padded.
    tail: list[tuple[list[int], list[int]]] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def real_tokens(self) -> int:
        return int((self.segment_ids > 0).sum())

    @property
    def efficiency(self) -> float:
        """Fraction of row positions holding real (non-pad) tokens."""
        return self.real_tokens / max(1, self.input_ids.size)

    def rows(self) -> list[dict[str, np.ndarray]]:
        return [{"input_ids": self.input_ids[i], "prompt_mask": self.prompt_mask[i], "segment_ids": self.segment_ids[i]}
                for i in range(self.num_rows)]


def eos_padded(response: Sequence[int], eos_token_id: int, max_extra: int, key: str,
               room: int | None = None) -> list[int]:
    """`response` followed by U[0, max_extra] extra EOS tokens (LLaDA's SFT EOS padding, with a random count).

    The objective always masks terminal tokens, so the extra EOS are masked positions past the answer
    that learn to say EOS; under a document mask they also stop a sample's extent from giving away
    its answer's length (README, objective study). The count is drawn from `key`, a stable name of
    the sample ("file:line"), with crc32 rather than Python's per-process salted hash: the same
    sample gets the same padding on every run, worker and machine. `room` caps the extra tokens, so
    padding never pushes a sample past a length limit.
    """
    if max_extra < 0:
        raise ValueError(f"max_extra is the most extra EOS tokens per answer: >= 0 (0 = no padding), got {max_extra}")
    extra = random.Random(zlib.crc32(key.encode())).randint(0, max_extra) if max_extra else 0
    if room is not None:
        extra = min(extra, max(0, room))
    return list(response) + [eos_token_id] * extra


def pack_samples(samples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, *, mode: str = "concat",
                 pad_token_id: int, keep_tail: bool = False) -> PackedRows:
    """Pack (prompt_ids, response_ids) samples into rows of `seq_len` tokens.

    No token is lost or duplicated: the concatenation of every row's non-pad tokens equals the
    concatenation of the packed samples (in "concat" mode in input order; in "no_split" mode each
    sample appears whole in exactly one row). Empty samples are dropped and reported.
    keep_tail (concat mode): return only full rows and hand the remainder back in `tail`.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if mode not in PACK_MODES:
        raise ValueError(f"unknown packing mode {mode!r}; choose one of {PACK_MODES}")
    dropped = [i for i, (p, r) in enumerate(samples) if len(p) + len(r) == 0]
    if mode == "concat":
        if keep_tail:
            return _pack_concat_keep_tail(samples, seq_len, pad_token_id, dropped)
        return _pack_concat(samples, seq_len, pad_token_id, dropped)
    return _pack_no_split(samples, seq_len, pad_token_id, dropped)


def _empty(n_rows: int, seq_len: int, pad_token_id: int):
    return (np.full((n_rows, seq_len), pad_token_id, dtype=np.int64), np.zeros((n_rows, seq_len), dtype=bool),
            np.zeros((n_rows, seq_len), dtype=np.int32))


def _pack_concat(samples, seq_len, pad_token_id, dropped) -> PackedRows:
    skip = set(dropped)
    lengths = [len(p) + len(r) for i, (p, r) in enumerate(samples) if i not in skip]
    total = sum(lengths)
    n_rows = -(-total // seq_len)
    ids, prompt, seg = _empty(n_rows, seq_len, pad_token_id)
    flat_ids, flat_prompt, flat_seg = ids.reshape(-1), prompt.reshape(-1), np.zeros(n_rows * seq_len, dtype=np.int64)
    pos = 0
    sample_no = 0
    for i, (p, r) in enumerate(samples):
        if i in skip:
            continue
        sample_no += 1
        n = len(p) + len(r)
        flat_ids[pos:pos + len(p)] = p
        flat_ids[pos + len(p):pos + n] = r
        flat_prompt[pos:pos + len(p)] = True
        flat_seg[pos:pos + n] = sample_no
        pos += n
    # Renumber segments per row: a sample piece that starts a row gets a new id in that row.
    seg_rows = flat_seg.reshape(n_rows, seq_len)
    for row in range(n_rows):
        s = seg_rows[row]
        real = s > 0
        if real.any():
            change = np.concatenate(([True], s[1:] != s[:-1])) & real
            seg[row] = np.where(real, np.cumsum(change), 0)
    return PackedRows(ids, prompt, seg, dropped)


def _pack_concat_keep_tail(samples, seq_len, pad_token_id, dropped) -> PackedRows:
    skip = set(dropped)
    kept = [(list(p), list(r)) for i, (p, r) in enumerate(samples) if i not in skip]
    total = sum(len(p) + len(r) for p, r in kept)
    full = (total // seq_len) * seq_len
    # Walk back from the end to split the stream at `full` tokens into rows and tail pieces.
    head, tail, pos = [], [], 0
    for p, r in kept:
        n = len(p) + len(r)
        if pos + n <= full:
            head.append((p, r))
        elif pos >= full:
            tail.append((p, r))
        else:
            cut = full - pos  # the sample straddles the boundary
            if cut <= len(p):
                head.append((p[:cut], []))
                tail.append((p[cut:], r))
            else:
                head.append((p, r[: cut - len(p)]))
                tail.append(([], r[cut - len(p):]))
        pos += n
    rows = _pack_concat(head, seq_len, pad_token_id, []) if head else PackedRows(*_empty(0, seq_len, pad_token_id))
    rows.dropped, rows.tail = dropped, tail
    return rows


def _pack_no_split(samples, seq_len, pad_token_id, dropped) -> PackedRows:
    skip = set(dropped)
    order = sorted((i for i in range(len(samples)) if i not in skip),
                   key=lambda i: -(len(samples[i][0]) + len(samples[i][1])))
    too_long = [i for i in order if len(samples[i][0]) + len(samples[i][1]) > seq_len]
    skip.update(too_long)
    # Best fit decreasing: each sample goes to the fullest row that still has room for it.
    row_members: list[list[int]] = []
    free_sorted: list[tuple[int, int]] = []  # (free space, row) kept sorted
    for i in order:
        if i in skip:
            continue
        n = len(samples[i][0]) + len(samples[i][1])
        k = bisect.bisect_left(free_sorted, (n, -1))
        if k < len(free_sorted):
            free, row = free_sorted.pop(k)
        else:
            row_members.append([])
            free, row = seq_len, len(row_members) - 1
        row_members[row].append(i)
        if free - n > 0:
            bisect.insort(free_sorted, (free - n, row))
    ids, prompt, seg = _empty(len(row_members), seq_len, pad_token_id)
    for row, members in enumerate(row_members):
        pos = 0
        for sample_no, i in enumerate(sorted(members), start=1):
            p, r = samples[i]
            n = len(p) + len(r)
            ids[row, pos:pos + len(p)] = p
            ids[row, pos + len(p):pos + n] = r
            prompt[row, pos:pos + len(p)] = True
            seg[row, pos:pos + n] = sample_no
            pos += n
    return PackedRows(ids, prompt, seg, sorted(dropped + too_long))
