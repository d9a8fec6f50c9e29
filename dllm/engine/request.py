"""One request's state. Everything the engine knows about a request lives here, once."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .config import GenerationConfig


class Phase(enum.Enum):
    WAITING = "waiting"  # queued, no cache slot yet
    PREFILL = "prefill"  # next forward: prompt + B masks
    DENOISE = "denoise"  # next forward: the B block tokens against the cache
    COMMIT = "commit"  # next forward: finished block + B new masks (writes the block's K/V)
    FINISHED = "finished"


@dataclass
class Generation:
    """The result of one request.

    token_ids:     generated ids, cut before the first stop token / stop string
    text:          decoded token_ids (empty without a tokenizer)
    finish_reason: "stop" (EOS/EOT/stop token/stop string), "length" (cap) or "abort"
    num_forwards:  model forwards this request took part in (NFE)
    """

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    num_forwards: int
    num_blocks: int
    prompt_tokens: int

    @property
    def tokens_per_forward(self) -> float:
        return len(self.token_ids) / max(1, self.num_forwards)


@dataclass
class RequestOutput:
    """What `Engine.step()` reports for a request: a committed block, and the end when it comes."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    generation: Generation | None = None


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    config: GenerationConfig
    max_new_tokens: int  # config.max_new_tokens clamped to what the cache slot can hold
    stop_ids: frozenset[int]
    phase: Phase = Phase.WAITING
    slot: int = -1
    cached_len: int = 0  # committed K/V positions in the slot
    block: torch.Tensor | None = None  # [B] current block, MASK where undecided
    generated: list[int] = field(default_factory=list)
    num_forwards: int = 0
    num_blocks: int = 0
    block_steps: int = 0  # forwards spent on the current block
    steps: int = 0  # forwards spent in total (iteration counter for smoothing schedules)
    generator: torch.Generator | None = None
    credit: torch.Tensor | None = None  # [B, V] credit decoding state of the current block
    smooth_delta: torch.Tensor | None = None  # [B, d] expected embedding from the previous step
    emitted_text: int = 0  # characters of text already streamed
    emitted_tokens: int = 0
    finish_reason: str | None = None
    final_ids: list[int] | None = None
    final_text: str = ""

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def query_len(self) -> int:
        if self.phase is Phase.PREFILL:
            return len(self.prompt_ids) + self.block_size
        if self.phase is Phase.COMMIT:
            return 2 * self.block_size
        return self.block_size
