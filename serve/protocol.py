"""OpenAI-compatible request/response shapes, our extra fields, and OpenAI-style errors."""

from __future__ import annotations

import itertools
import json
import math
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

import dllm
from dllm.engine.json_mode import openai_response_format
from dllm.engine.json_schema import SchemaError, compile_schema

if TYPE_CHECKING:
    from .tools import ForcedCall, ParsedCalls


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MAX_CHOICES = 64  # choices (prompts x n) in one request: each takes a batch slot
DEFAULT_MC_SAMPLES = 64  # masked copies per continuation that a likelihood estimate averages


class DiffusionOptions(BaseModel):
    """Our extras, accepted as extra body fields (OpenAI clients: `extra_body={...}`)."""

    block_size: int | None = Field(default=None, ge=1, le=1024)
    threshold: float | None = Field(default=None, gt=0.0, le=1.0)
    decoder: Literal[dllm.engine.DECODERS] | None = None  # type: ignore[valid-type]
    cache_policy: Literal[dllm.engine.CACHE_POLICIES] | None = None  # type: ignore[valid-type]
    commit_pass: bool | None = None
    early_stop: bool | None = None
    stops_last: bool | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False  # a last chunk with the request's usage
    continuous_usage_stats: bool = False  # vLLM's, with include_usage: each chunk with its choice's usage so far


class _Common(DiffusionOptions):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # vLLM's extra: sample among the k most likely tokens (-1 or 0: all)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)  # vLLM's extra: tokens at least min_p x the top one's p
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False  # vLLM's extra: the stop string that cut the answer ends its text
    skip_special_tokens: bool = True  # vLLM's extra: False writes special tokens (EOS of an ignore_eos answer) too
    # vLLM's extra: keep the prompt's last k tokens (-1: as many as leave room for one block)
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    allowed_token_ids: list[int] | None = Field(default=None, min_length=1)  # vLLM's extra: only these are generated
    stop_token_ids: list[int] | None = None  # vLLM's extra: these ids end the answer too (EOS and EOT always do)
    priority: int = 0  # vLLM's extra: lower runs first, on a server whose scheduling_policy is priority
    # vLLM's extra: the answer is one of these strings, the one the model finds most likely (see OpenAIIngress._guided)
    guided_choice: list[str] | None = Field(default=None, min_length=1, max_length=MAX_CHOICES)
    # vLLM's names for guided_choice and JSON answers: {"choice": [...]}, {"json": schema}, {"json_object": true}
    # (vLLM >= 0.12), and guided_json (a schema, older vLLM): see fold_structured_outputs
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    # OpenAI's JSON mode, {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema"}} (on
    # /v1/completions too, as vLLM takes it): see response_format_of
    response_format: dict[str, Any] | None = None
    ignore_eos: bool = False  # vLLM's extra: EOS/EOT do not end the answer (fixed-length load tests)
    min_tokens: int = Field(default=0, ge=0)  # vLLM's extra: no stop token among the first min_tokens
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)  # vLLM's extra (1 = off)
    logit_bias: dict[str, float] | None = None  # {"token id": bias in [-100, 100]}


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=dllm.engine.MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    # a string, or OpenAI's content parts ([{"type": "text", "text": ...}, ...]: see message_text); None only in
    # an assistant message that holds tool_calls
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an earlier answer's calls (assistant)
    tool_call_id: str | None = None  # the call a tool message answers


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=dllm.engine.MAX_LOGPROBS)
    max_completion_tokens: int | None = None
    # OpenAI's function tools: {"type": "function", "function": {"name", "description", "parameters"}}; a call is
    # made where tool_choice names a function or is "required", or written by the model under "auto" on a server with
    # a tool-call parser: see serve.tools
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # a forced call is one call, which either value allows
    # vLLM's extras: the template's opening of the answer, or (instead) the final message left open so
    # that the answer continues it (an assistant message started by the client)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False  # vLLM's extra: the answer starts with the final message's text if it is the assistant's


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages (wrapped in the chat template)."""
    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Any] | None = None  # with messages: as the chat route shows them to the template
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class LoglikelihoodRequest(BaseModel):
    """Our /v1/loglikelihood: the ELBO estimate of log p(continuation | prompt) per continuation
    (dllm.log_likelihood), e.g. to rank a multiple-choice question's answers. Strings are tokenised
    separately (prompt, then each continuation); give token ids to control the split."""
    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str | list[int]
    continuations: list[str] | list[list[int]] = Field(min_length=1, max_length=MAX_CHOICES)
    mc_samples: int = Field(default=DEFAULT_MC_SAMPLES, ge=1, le=1024)
    seed: int = 0


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    tokens: list[int]


def reject_unsupported(req: _Common, tools: ForcedCall | ParsedCalls | None = None) -> tuple[str | None, dict | None]:
    """Parameters we accept for compatibility only at their neutral values, and those that do not go together;
    `tools`: what the request's tools make of its answers (serve.tools.tool_use). Returns the request's
    response_format_of (worked out here once: it compiles the schema)."""
    checks = []
    if isinstance(req, CompletionRequest):
        checks += [("best_of", req.best_of not in (None, 1, req.n),
                    "best_of other than n is not supported: a diffusion model has no sequence log-probability to rank "
                    "by, and ranking by its likelihood bound measured worse than a slower decoder (decoder=fixed_k)"),
                   ("suffix", req.suffix is not None, "suffix (infilling) is not supported"),
                   ("logprobs", req.echo and req.logprobs is not None,
                    "logprobs with echo (prompt logprobs) are not supported: a masked diffusion model has no "
                    "left-to-right probabilities of the prompt's tokens")]
    if isinstance(req, ChatCompletionRequest):
        checks += [("echo", req.echo and tools is not None,
                    "echo does not go with tool calls: an answer's calls are taken out of the model's text"),
                   ("logprobs", req.echo and req.logprobs,
                    "logprobs with echo are not supported: the echoed text is the client's, with no log-probabilities"),
                   ("guided_choice", req.guided_choice is not None and tools is not None,
                    "guided_choice answers with one of its strings, not with tool calls: give one of them (or "
                    "tool_choice 'none')")]
    checks.append(("guided_choice", req.guided_choice is not None and logprobs_wanted(req) is not None,
                   "logprobs are not available with guided_choice: the answer is chosen by its likelihood, not "
                   "decoded token by token"))
    response_format = response_format_of(req, tools)
    json_mode = response_format[0] is not None  # a forced tool call's arguments too
    checks += [("guided_choice", json_mode and req.guided_choice is not None,
                "guided_choice and a JSON answer (response_format or a forced tool call) are two answers' shapes; "
                "give one"),
               ("ignore_eos", json_mode and req.ignore_eos,
                "ignore_eos does not go with a JSON answer (response_format or a forced tool call): the answer "
                "ends where the object closes"),
               ("allowed_token_ids", json_mode and req.allowed_token_ids is not None,
                "allowed_token_ids do not go with a JSON answer (response_format or a forced tool call): JSON mode "
                "chooses each token among those that keep the answer valid JSON"),
               ("min_tokens", json_mode and req.min_tokens > 0,
                "min_tokens does not go with a JSON answer (response_format or a forced tool call): the answer "
                "ends where the object closes"),
               ("decoder", json_mode and req.decoder not in (None, "threshold"),
                "a JSON answer (response_format or a forced tool call) decodes from the left by the threshold rule: "
                "use decoder 'threshold' (or none)")]
    for param, bad, message in checks:
        if bad:
            raise APIError(400, message, param=param, code="unsupported_parameter")
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    return response_format


def check_schema(schema: dict, where: str, param: str) -> None:
    """A schema answers can be held to (compile_schema), or a 400 naming the keyword they would not be, and where."""
    try:
        compile_schema(schema)
    except SchemaError as e:
        raise APIError(400, f"{where}: {e}", param=param, code="unsupported_parameter") from e


STRUCTURED_OUTPUTS = ("choice", "json", "json_object")  # the structured_outputs keys we hold answers to


def fold_structured_outputs(req: _Common) -> None:
    """Rewrite vLLM's structured_outputs / guided_json as the fields they name here: choice -> guided_choice, json (a
    schema, or its JSON text) -> response_format json_schema, json_object -> response_format json_object. One shape
    per request; the other keys (regex, grammar, structural_tag, ...) are 400s that name them."""
    given = dict(req.structured_outputs or {})
    if req.guided_json is not None:
        if "json" in given:
            raise APIError(400, "give guided_json or structured_outputs.json, not both", param="guided_json",
                           code="invalid_value")
        given["json"] = req.guided_json
    if not given:
        return
    param = "structured_outputs" if req.structured_outputs else "guided_json"
    unknown = sorted(set(given) - set(STRUCTURED_OUTPUTS))
    if unknown:
        raise APIError(400, f"structured_outputs {unknown} are not supported; this server holds answers to "
                            f"{list(STRUCTURED_OUTPUTS)}", param="structured_outputs", code="unsupported_parameter")
    shapes = [k for k in STRUCTURED_OUTPUTS if given.get(k) not in (None, False)]
    formatted = (req.response_format or {}).get("type") not in (None, "text")
    if len(shapes) + (req.guided_choice is not None) + formatted > 1:
        raise APIError(400, "give one shape for the answer: structured_outputs / guided_json, guided_choice and "
                            "response_format each name one", param=param, code="invalid_value")
    if not shapes:
        return
    value = given[shapes[0]]
    if shapes[0] == "choice":
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_CHOICES or \
                not all(isinstance(c, str) for c in value):
            raise APIError(400, f"structured_outputs.choice must be a list of 1 to {MAX_CHOICES} strings",
                           param=param, code="invalid_value")
        req.guided_choice = value
    elif shapes[0] == "json_object":
        req.response_format = {"type": "json_object"}
    else:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise APIError(400, f"the JSON schema is not JSON: {e}", param=param, code="invalid_value") from e
        if not isinstance(value, dict):
            raise APIError(400, "the JSON schema must be a JSON object", param=param, code="invalid_value")
        check_schema(value, param, param)
        req.response_format = {"type": "json_schema", "json_schema": {"name": "structured_outputs", "schema": value}}
    req.structured_outputs = req.guided_json = None  # folded: the request reads as its new fields say


def response_format_of(req: _Common, tools: ForcedCall | ParsedCalls | None = None) -> tuple[str | None, dict | None]:
    """GenerationConfig's (response_format, json_schema) of a request: (None, None) for text, ("json_object", None)
    for OpenAI's JSON mode, ("json_schema", the schema) for structured outputs, whose schema is checked here (a
    keyword answers would not be held to is a 400 that names it), and for a forced tool call (its parameters).
    `tools`: what the request's tools make of its answers (serve.tools.tool_use)."""
    try:
        kind, schema = (None, None) if req.response_format is None else openai_response_format(req.response_format)
    except ValueError as e:
        raise APIError(400, f"response_format {e}", param="response_format", code="invalid_value") from e
    if tools is not None and kind is not None:
        raise APIError(400, "a forced tool call's arguments are held to its parameters' schema, and tool_choice "
                            "'auto' answers in text that may hold calls: give either response_format or tools "
                            "(or tool_choice 'none')", param="response_format", code="invalid_value")
    from .tools import ForcedCall  # (serve.tools builds on this module)

    if isinstance(tools, ForcedCall):  # the answer is the call's arguments
        return "json_schema", tools.schema
    if schema is not None:
        check_schema(schema, "response_format json_schema", "response_format")
    return kind, schema


def message_text(message: ChatMessage, index: int) -> str:
    """A message's content as the chat template reads it: the string, or its text parts joined by
    newlines (as vLLM joins them). Other parts (images, audio, files) are refused: the model reads text."""
    if isinstance(message.content, str):
        return message.content
    if message.content is None:
        if message.role == "assistant" and message.tool_calls:
            return ""  # an answer that was a tool call
        raise APIError(400, f"messages[{index}] needs content (only an assistant message with tool_calls may "
                            "leave it out)", param="messages", code="invalid_value")
    texts = []
    for j, part in enumerate(message.content):
        kind = part.get("type")
        if kind != "text":
            raise APIError(400, f"messages[{index}].content[{j}] is a part of type {kind!r}; only 'text' parts are "
                                "supported: this model reads text only", param="messages", code="invalid_value")
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{index}].content[{j}] needs a 'text' string", param="messages",
                           code="invalid_value")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_conversation(messages: list[ChatMessage], add_generation_prompt: bool,
                      continue_final_message: bool) -> list[dict[str, str]]:
    """The messages as a chat template takes them, with the two templating options checked."""
    if not messages:
        raise APIError(400, "'messages' must hold at least one message", param="messages", code="invalid_value")
    if continue_final_message and add_generation_prompt:
        raise APIError(400, "continue_final_message needs add_generation_prompt: false (a generation prompt opens a "
                            "new message after the final one)", param="continue_final_message",
                       code="invalid_value")
    conversation = [{"role": m.role, "content": message_text(m, i)} for i, m in enumerate(messages)]
    for turn, m in zip(conversation, messages):  # for templates that render tool calls and their results
        if m.tool_calls:
            turn["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            turn["tool_call_id"] = m.tool_call_id
    if continue_final_message and not conversation[-1]["content"].strip():
        raise APIError(400, "continue_final_message needs a final message with text to continue",
                       param="continue_final_message", code="invalid_value")
    return conversation


def logit_bias_ids(req: _Common) -> dict[int, float] | None:
    """The request's logit_bias keyed by token id (GenerationConfig.logit_bias), or an APIError; the
    ids are not yet checked against the vocabulary."""
    if not req.logit_bias:
        return None
    out = {}
    for key, bias in req.logit_bias.items():
        if not key.strip().isdigit():
            raise APIError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias",
                           code="invalid_value")
        if not -100 <= bias <= 100:
            raise APIError(400, f"logit_bias values must be in [-100, 100], got {bias} for token {key}",
                           param="logit_bias", code="invalid_value")
        out[int(key)] = bias
    return out


def logprobs_wanted(req: _Common) -> int | None:
    """Alternatives per token the request asked for (GenerationConfig.logprobs), None for no logprobs."""
    if isinstance(req, ChatCompletionRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.logprobs


# Token logprobs in responses. Each comes from the forward that committed the token (see
# GenerationConfig.logprobs); `token_text(id)` is the token's text.

def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else -9999.0  # JSON has no -inf; OpenAI's floor


def completion_logprobs(entries: list[dllm.engine.TokenLogprob], token_text: Callable[[int], str],
                        text_offset: int = 0) -> dict:
    """/v1/completions' logprobs object; `top_logprobs` holds the k alternatives and the chosen token."""
    tokens = [token_text(e.token_id) for e in entries]
    offsets = list(itertools.accumulate(map(len, tokens), initial=text_offset))[:-1]
    return {"tokens": tokens, "token_logprobs": [_finite(e.logprob) for e in entries],
            "top_logprobs": [{token_text(t): _finite(lp) for t, lp in [*e.top, (e.token_id, e.logprob)]}
                             for e in entries],
            "text_offset": offsets}


def chat_logprobs(entries: list[dllm.engine.TokenLogprob], token_text: Callable[[int], str]) -> dict:
    """/v1/chat/completions' logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def item(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode())}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
