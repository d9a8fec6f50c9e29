"""One request's state. Everything the engine knows about a request lives here, once."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .config import GenerationConfig
from .json_mode import JsonPrefix
from .kv_cache import SwappedKV


class Phase(enum.Enum):
    WAITING = "waiting"  # queued, no cache slot yet (or preempted: see Request.resume_phase)
    PREFILL = "prefill"  # next forward: prompt + B masks
    DENOISE = "denoise"  # next forward: the B block tokens against the cache
    COMMIT = "commit"  # next forward: finished block + B new masks (writes the block's K/V)
    REBUILD = "rebuild"  # resumed after a recompute preemption: forwards that rebuild committed K/V, no decoding
    FINISHED = "finished"


@dataclass
class BlockTrajectory:
    """How one block was denoised: its final tokens and, per position, the step (0 = the block's first
    forward) that committed it. State s_i of the block = the positions with reveal_step < i."""

    tokens: list[int]
    reveal_step: list[int]

    @property
    def steps(self) -> int:
        return max(self.reveal_step) + 1


@dataclass
class TokenLogprob:
    """A generated token's log-probability, and the most likely tokens at its position, from the
    forward that committed it (GenerationConfig.logprobs)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, log-probability), most likely first


@dataclass
class Generation:
    """The result of one request.

    token_ids:     generated ids, cut before the first stop token / stop string
    text:          decoded token_ids (empty without a tokenizer)
    finish_reason: "stop" (EOS/EOT/stop token/stop string), "length" (cap) or "abort"
    num_forwards:  model forwards this request took part in (NFE)
    trajectory:    with GenerationConfig(record_trajectory=True), one BlockTrajectory per decoded block
    logprobs:      with GenerationConfig(logprobs=k), one TokenLogprob per token id
    cached_prompt_tokens: prompt tokens not run through the model: their K/V were an earlier request's
                   (Engine prefix_caching); 0 or prompt_tokens
    """

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    num_forwards: int
    num_blocks: int
    prompt_tokens: int
    trajectory: list[BlockTrajectory] | None = None
    logprobs: list[TokenLogprob] | None = None
    cached_prompt_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (an earlier request's)

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
    new_logprobs: list[TokenLogprob] | None = None  # one per new token id (GenerationConfig.logprobs)


@dataclass(eq=False)  # a request is itself, not its fields: membership tests compare identity
class Request:
    request_id: str
    prompt_ids: list[int]
    config: GenerationConfig
    max_new_tokens: int  # config.max_new_tokens clamped to what the cache slot can hold
    stop_ids: frozenset[int]
    priority: int = 0  # lower runs first (Scheduler scheduling_policy "priority"; 0 under fcfs)
    arrival: int = 0  # its place in the order requests were added (Scheduler.add)
    phase: Phase = Phase.WAITING
    slot: int = -1  # its page-table row in the K/V cache while it runs
    # A request admitted in the same step with the same prompt, whose prefill row it shares (its prompt's
    # full pages are that request's; the partly filled last page is copied after the prefill).
    prefill_source: "Request | None" = None
    cached_len: int = 0  # committed K/V positions in the slot
    # Preempted (Scheduler.make_room): the phase it resumes in, and its committed K/V in host memory where
    # they were swapped out (otherwise they are rebuilt: Phase.REBUILD, `rebuilt` positions so far).
    resume_phase: Phase | None = None
    swapped: "SwappedKV | None" = None
    rebuilt: int = 0
    cached_prompt_tokens: int = 0  # prompt K/V taken from the prefix cache instead of a prefill
    block: torch.Tensor | None = None  # [B] current block, MASK where undecided
    generated: list[int] = field(default_factory=list)
    num_forwards: int = 0
    num_blocks: int = 0
    block_steps: int = 0  # forwards spent on the current block
    masks_left: int = 0  # masks in the current block at the last host sync
    reveal_step: list[int] | None = None  # per position of the current block (record_trajectory)
    trajectory: list[BlockTrajectory] | None = None
    steps: int = 0  # forwards spent in total (iteration counter for smoothing schedules)
    generator: torch.Generator | None = None
    credit: torch.Tensor | None = None  # [B, V] credit decoding state of the current block
    smooth_delta: torch.Tensor | None = None  # [B, d] expected embedding from the previous step
    # Penalties (GenerationConfig.penalised), on the device: how often each token occurs in the output so
    # far [V] (stop tokens not counted), which tokens the prompt holds [V] (repetition_penalty), and the
    # distinct tokens of the prompt and the finished blocks, with len(generated) when they were listed.
    output_counts: torch.Tensor | None = None
    in_prompt: torch.Tensor | None = None
    history_tokens: tuple[int, torch.Tensor] | None = None
    allowed: torch.Tensor | None = None  # [V] bool, GenerationConfig.allowed_token_ids on the device
    json_start: JsonPrefix | None = None  # JSON mode: the state of the answer before the current block
    graph_row: tuple | None = None  # (decoders, stop width, its decoders.greedy_row) in a decode graph
    # GenerationConfig.logprobs: per position of the current block, on the device until the block ends:
    # (log-probability of the committed token [B], top-k log-probabilities [B, k], their ids [B, k]).
    block_logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    logprobs: list[TokenLogprob] | None = None  # one per entry of `generated`
    emitted_text: int = 0  # characters of text already streamed
    emitted_tokens: int = 0
    finish_reason: str | None = None
    final_ids: list[int] | None = None
    final_text: str = ""

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def first_stop(self, tokens: list[int]) -> int | None:
        """The position of the first of its stop tokens among `tokens` (a block's), or None."""
        return next((j for j, t in enumerate(tokens) if t in self.stop_ids), None)

    @property
    def streams_settled(self) -> bool:
        """GenerationConfig.stream_settled applies: no logprobs (read when a block ends) or stop strings (cut then)."""
        return self.config.stream_settled and self.logprobs is None and not self.config.stop

    @property
    def min_tokens_pending(self) -> bool:
        """min_tokens still bars stop tokens from some of the next positions (only where it has some)."""
        return self.config.min_tokens > len(self.generated) and bool(self.stop_ids)

    @property
    def prompt_key(self) -> tuple:
        """What a prefill's prompt K/V depend on: the prompt and the mask block it sees (the block size)."""
        return self.block_size, *self.prompt_ids

    @property
    def cache_extent(self) -> int:
        """Cache positions the request can ever write: the prompt and max_new_tokens in whole blocks
        (a COMMIT forward writes the finished block and the next one, never past the last block)."""
        return len(self.prompt_ids) + -(-self.max_new_tokens // self.block_size) * self.block_size

    def extent(self, phase: Phase | None = None) -> int:
        """Cache positions a forward in `phase` (default: the request's own) writes up to: the committed
        context (or, for a prefill, the prompt), [the finished block,] the block. Whatever a cache policy
        recomputes lies before the committed length."""
        phase = phase or self.phase
        start = len(self.prompt_ids) if phase is Phase.PREFILL else self.cached_len
        return start + (self.block_size if phase is Phase.COMMIT else 0) + self.block_size

    @property
    def rebuildable(self) -> bool:
        """Its committed K/V can be rebuilt as they were written, from its tokens alone (Phase.REBUILD):
        the commit pass wrote them, or the cache policy recomputes them at every forward. Without the
        commit pass (dllm-var, vicinity) they come from a block's last denoise step, whose input (and,
        with smoothing, its embeddings) is gone: such a request is always swapped."""
        return self.config.commit_pass or self.config.cache_policy == "none"

    def rebuild_query(self) -> tuple[int, list[int]] | None:
        """REBUILD: (cache offset, tokens) of the next forward that rebuilds committed K/V, the tokens
        followed by B masks as the first time, so the K/V come out as they were; None where every K/V
        the request still reads is rebuilt.
        - dllm-var: its prefill (prompt + B masks), then one commit forward per committed block
          (block + B masks); the prompt's pages may come from the prefix cache instead.
        - vicinity: a denoise step reads the context K/V its block's first forward wrote (every forward
          recomputes the last `vicinity` tokens): that refresh, the whole context + B masks. Entering a
          block (COMMIT) refreshes it all anyway.
        - none: every forward recomputes the whole context."""
        policy = self.config.cache_policy
        if policy == "none" or self.rebuilt >= self.cached_len:
            return None
        if policy == "vicinity":
            return (0, self.context_ids()) if self.resume_phase is Phase.DENOISE else None
        if self.rebuilt == 0:
            return 0, self.prompt_ids
        start = self.rebuilt - len(self.prompt_ids)
        return self.rebuilt, self.generated[start:start + self.block_size]

    @property
    def keeps_prompt_kv(self) -> bool:
        """The slot's prompt K/V stay as the prefill wrote them (the dllm-var cache policy never recomputes
        committed K/V; the others refresh them)."""
        return self.config.cache_policy == "dllm-var"

    def context_ids(self) -> list[int]:
        """The tokens whose K/V are committed in the slot: the prompt, then the committed blocks."""
        return self.prompt_ids + self.generated[: self.cached_len - len(self.prompt_ids)]

    def recomputed(self) -> tuple[int, list[int]]:
        """(cache offset, committed tokens recomputed before the block) of the next forward.

        The query is those tokens, then [the finished block, if COMMIT], then the block being decoded.
        Cache policies (GenerationConfig.cache_policy):
        - dllm-var: nothing is recomputed; the block attends to the committed K/V as it is.
        - vicinity: each DENOISE step recomputes the last `vicinity` committed tokens with the block in
          view (refreshing their K/V); entering a block (COMMIT) recomputes the whole context.
        - none: every forward recomputes the whole context (no reuse of K/V at all).
        """
        if self.phase is Phase.PREFILL:
            return 0, self.prompt_ids
        policy = self.config.cache_policy
        if policy == "dllm-var":
            return self.cached_len, []
        context = self.context_ids()
        if policy == "vicinity" and self.phase is Phase.DENOISE:
            left = min(self.config.vicinity, self.cached_len)
            return self.cached_len - left, context[self.cached_len - left:]
        return 0, context  # a full refresh

    @property
    def finished_block_len(self) -> int:
        """Tokens of the finished block a query carries before the decoded block (COMMIT only)."""
        return self.block_size if self.phase is Phase.COMMIT else 0

    def query_len(self) -> int:
        """Tokens in the next forward: the recomputed ones, [the finished block,] the block (or, to
        rebuild K/V, the tokens of rebuild_query and B masks)."""
        if self.phase is Phase.REBUILD:
            return len(self.rebuild_query()[1]) + self.block_size
        return len(self.recomputed()[1]) + self.finished_block_len + self.block_size
