"""Decoding settings of one request."""

from __future__ import annotations

import dataclasses
import math
import reprlib
from dataclasses import dataclass, field

from .json_mode import RESPONSE_FORMATS
from .json_schema import SchemaError, compile_schema

DECODERS = ("threshold", "factor", "credit", "hierarchical", "fixed_k")
CACHE_POLICIES = ("dllm-var", "vicinity", "none")
MAX_LOGPROBS = 20  # alternatives per generated token (as vLLM's default max_logprobs)


@dataclass
class GenerationConfig:
    """How one request is decoded.

    block_size:      B, tokens per block (dLLM-Var default 64)
    threshold:       tau: commit every masked position with confidence >= tau (always >= 1 token)
    max_new_tokens:  cap on generated tokens (the answer is cut there, finish_reason "length")
    decoder:         one of DECODERS (see dllm.engine.decoders)
    temperature:     0 = greedy; > 0 samples candidates from softmax(logits / T), seeded by `seed`
    top_k, top_p, min_p: with temperature > 0, each position samples its candidate only among the
                     tokens at least min_p times as likely as the most likely one, of them its top_k
                     most likely (0 = all), and of those the smallest set holding top_p of the
                     tempered probability (the nucleus): vLLM's order. They choose which token a
                     position proposes; which positions commit still follows the model's probability
                     of that token (the unfiltered softmax: renormalising over a narrow set would
                     inflate the confidence). No effect on greedy decoding.
    logit_bias:      {token id: bias in [-100, 100]} added to the logits at every generated position
                     (OpenAI's logit_bias: -100 bans a token, +100 all but forces it); it changes the
                     distribution the decoders see, greedy included
    allowed_token_ids: only these tokens may be generated (vLLM's allowed_token_ids): every other token's
                     logit is -inf at every generated position, after logit_bias, greedy included, and
                     the decoders' confidences are those of the distribution renormalised over them. A
                     stop token (EOS) that is not listed cannot end the answer: it runs to max_new_tokens
, frequency_penalty, repetition_penalty: vLLM's penalties on the tokens generated
                     so far (committed in earlier blocks and in earlier steps of this one), applied after
                     logit_bias at every masked position, greedy included: a token's logit loses
                     presence_penalty once it occurs and frequency_penalty per occurrence (OpenAI's,
                     each in [-2, 2]); repetition_penalty (> 0, 1 = off) divides the positive logits of
                     the tokens seen in the prompt or the output and multiplies the negative ones. Stop
                     tokens are not counted (an autoregressive answer holds none; a block's EOS run
                     would otherwise push its masks away from EOS). Positions committed in the same
                     step do not see each other.
    seed:            per-request seed: the same seed gives the same output
    stop_token_ids:  extra token ids that end the answer (EOS and EOT always do)
    stop:            stop strings (need a tokenizer); the text is cut before the first one (the one that
                     starts first; of those starting at the same place, the first listed)
    include_stop_str_in_output: keep the stop string that cut the text at its end (vLLM's)
    skip_special_tokens: the text leaves out the tokenizer's special tokens (default, as vLLM's); False
                     writes them (e.g. the EOS tokens of an ignore_eos answer)
    ignore_eos:      EOS and EOT do not end the answer (stop_token_ids still do): decode up to
                     max_new_tokens, the EOS tokens kept in token_ids (not in the text). For load tests
                     with fixed output lengths, as vLLM's ignore_eos.
    min_tokens:      no stop token (EOS, EOT, stop_token_ids) among the first min_tokens generated
                     positions: the decoders never propose one there (vLLM's min_tokens)
    early_stop:      end a block as soon as a stop token is committed with no mask before it (the
                     answer is then settled; the positions after it would only cost forwards).
                     Same tokens, fewer forwards; off by default (the paper decodes the whole block).
    stops_last:      settle the answer's length last (default): a stop token (EOS/EOT/stop_token_ids) is
                     committed only where every position left of it is decided, already or in this
                     step (decoders.stops_last). Plain confidence order commits a short answer's EOS
                     run first and cuts answers short: on two CPU-trained checkpoints +8 points exact
                     match at the same TPF, or 3.3x the TPF at the same exact match (README).
                     False: the paper's decoding.
    commit_pass:     True (default, the paper's): after a finished block, one forward over
                     [finished block + B masks] writes the block's K/V. False: keep the K/V of the
                     block's last denoise step and save that forward (an approximation).
    factor:          f of the factor rule (commit the largest n with (n+1)(1-c_n) < f)
    low_threshold:   hierarchical decoding's per-run threshold (at or above `threshold` it adds nothing:
                     every position above `threshold` is committed anyway)
    tokens_per_step: k of the fixed_k (low-confidence remasking) decoder
    credit_alpha/beta/gamma: credit decoding (dInfer defaults 0.7 / 0.8 / 0.2)
    cache_policy:    "dllm-var" (default): committed K/V is reused as it is; "vicinity" (dInfer): each
                     step also recomputes the last `vicinity` committed tokens, and a new block starts
                     with a full refresh of the context; "none": every forward recomputes everything
    vicinity:        committed tokens left of the block that the vicinity policy recomputes per step
    record_trajectory: keep, per block, the step at which each position was committed (the data of
                     trajectory compression, `dllm.trajectory`); costs one host read per step
    stream_settled:  stream the block's settled prefix as it grows (the positions left of its first mask,
                     up to a stop token: they can no longer change), not only whole blocks, so that a
                     streaming client sees text after a block's first steps; one more small host read per
                     step. Requests with logprobs or stop strings stream whole blocks all the same (their
                     logprobs are read, and their stop strings cut, when a block ends).
    logprobs:        None = off; k in [0, MAX_LOGPROBS]: return each generated token's log-probability and
                     the k most likely tokens at its position, as the model gave them in the forward
                     that committed the token (its distribution at temperature 1, MASK excluded, before
                     logit_bias, penalties, min_tokens and credit; the positions still masked then are unknown
                     to it). A diffusion model has no left-to-right factorisation: these are
                     commit-time probabilities, not a sequence likelihood.
    response_format: None, "json_object": the answer is one JSON object (OpenAI's JSON mode; see
                     dllm.engine.json_mode), or "json_schema": one held to `json_schema` (a JSON Schema dict;
                     dllm.engine.json_schema says which keywords are enforced, and the others are refused).
                     Its blocks are decoded from the left by the threshold rule (the decoder must be
                     "threshold"), each position with its most likely token that keeps the answer a JSON prefix (temperature > 0: sampled among the valid ones of its 64 most
                     likely); EOS follows the closed object. Needs a tokenizer; not with ignore_eos or
                     min_tokens (the object's end is the answer's). One host read per step of such a row.
    smoothing:       iteration smoothing (dInfer): masked inputs get mask-embedding + alpha_t * E[emb]
    smoothing_alpha: (initial, growth per step, max) of alpha_t; the threshold decays 1.0 -> tau by
                     smoothing_threshold_decay per step
    """

    block_size: int = 64
    threshold: float = 0.9
    max_new_tokens: int = 1024
    decoder: str = "threshold"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    stop: list[str] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    ignore_eos: bool = False
    min_tokens: int = 0
    early_stop: bool = False
    stops_last: bool = True
    commit_pass: bool = True
    factor: float = 1.0
    low_threshold: float = 0.6
    tokens_per_step: int = 1
    credit_alpha: float = 0.7
    credit_beta: float = 0.8
    credit_gamma: float = 0.2
    record_trajectory: bool = False
    stream_settled: bool = False
    logprobs: int | None = None
    cache_policy: str = "dllm-var"
    vicinity: int = 16
    response_format: str | None = None
    json_schema: dict | None = None
    smoothing: bool = False
    smoothing_alpha: tuple[float, float, float] = field(default=(0.15, 0.02, 0.3))
    smoothing_threshold_decay: float = 0.02

    def __post_init__(self) -> None:
        def bad(name, allowed):
            raise ValueError(f"GenerationConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        if not isinstance(self.block_size, int) or not 1 <= self.block_size <= 1024:
            bad("block_size", "an integer in [1, 1024]")
        if not 0.0 < self.threshold <= 1.0:
            bad("threshold", "a confidence in (0, 1]")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an integer >= 1")
        if type(self.min_tokens) is not int or not 0 <= self.min_tokens <= self.max_new_tokens:
            bad("min_tokens", "an integer in [0, max_new_tokens]")
        if self.decoder not in DECODERS:
            bad("decoder", f"one of {list(DECODERS)}")
        if self.cache_policy not in CACHE_POLICIES:
            bad("cache_policy", f"one of {list(CACHE_POLICIES)}")
        if not isinstance(self.vicinity, int) or self.vicinity < 0:
            bad("vicinity", "an integer >= 0")
        if self.temperature < 0:
            bad("temperature", "a number >= 0")
        if type(self.top_k) is not int or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = every token)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "a probability in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "a number in [0, 1]")
        if self.logit_bias is not None and not (
                isinstance(self.logit_bias, dict)
                and all(type(t) is int and t >= 0 and isinstance(v, (int, float)) and -100 <= v <= 100
                        for t, v in self.logit_bias.items())):
            bad("logit_bias", "a dict of token id -> bias in [-100, 100]")
        if self.allowed_token_ids is not None and not (
                isinstance(self.allowed_token_ids, list) and self.allowed_token_ids
                and all(type(t) is int and t >= 0 for t in self.allowed_token_ids)):
            bad("allowed_token_ids", "None or a non-empty list of token ids")
        for name in ("presence_penalty", "frequency_penalty"):
            if not isinstance(getattr(self, name), (int, float)) or not -2.0 <= getattr(self, name) <= 2.0:
                bad(name, "a number in [-2, 2]")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0.0 < self.repetition_penalty < math.inf:
            bad("repetition_penalty", "a finite number > 0 (1 = off)")
        if self.factor <= 0:
            bad("factor", "a number > 0")
        if not 0.0 <= self.low_threshold <= 1.0:
            bad("low_threshold", "a confidence in [0, 1]")
        if not isinstance(self.tokens_per_step, int) or self.tokens_per_step < 1:
            bad("tokens_per_step", "an integer >= 1")
        if self.logprobs is not None and (type(self.logprobs) is not int or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"None or an integer in [0, {MAX_LOGPROBS}]")
        if self.stop is not None and (not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop)):
            bad("stop", "a list of non-empty strings")
        if self.stop_token_ids is not None and not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "a list of token ids")
        if self.json_schema is not None and self.response_format != "json_schema":
            bad("json_schema", "given with response_format='json_schema' only")
        if self.response_format is not None:
            if self.response_format not in RESPONSE_FORMATS:
                bad("response_format", f"None or one of {list(RESPONSE_FORMATS)}")
            if self.response_format == "json_schema":
                try:
                    compile_schema(self.json_schema)
                except SchemaError as e:
                    raise ValueError(f"GenerationConfig.json_schema={reprlib.repr(self.json_schema)} is not one JSON "
                                     f"mode can hold answers to: {e}") from e
            for name, clash in (("decoder", self.decoder != "threshold"), ("ignore_eos", self.ignore_eos),
                                ("min_tokens", self.min_tokens > 0), ("allowed_token_ids", self.allowed_token_ids)):
                if clash:
                    raise ValueError(f"GenerationConfig.{name}={getattr(self, name)!r} does not go with response_format="
                                     f"{self.response_format!r}: JSON mode decodes from the left by the threshold rule, "
                                     "chooses its own tokens (those that keep the answer a JSON prefix) and ends the "
                                     "answer where the object closes (use decoder='threshold', no ignore_eos, "
                                     "min_tokens=0, no allowed_token_ids)")

    @property
    def penalised(self) -> bool:
        """Whether any of the repetition penalties is on."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def replace(self, **changes) -> "GenerationConfig":
        return dataclasses.replace(self, **changes)
