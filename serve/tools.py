"""Function tools on the chat route: what a request's `tools` and `tool_choice` make of its answers.

Two ways to a call (OpenAI's `message.tool_calls`):
- forced (ForcedCall): tool_choice names a function, or is "required". The answer *is* the call, held to the
  function's parameters by JSON mode, so any model writes a valid call.
- parsed (ParsedCalls): tool_choice "auto" (OpenAI's default where tools are given) on a server started with a
  tool-call parser. The model answers freely and decides itself whether to call; the calls it writes in the
  parser's format (a model trained to write them) are taken out of its text, as vLLM's tool parsers do. Without a
  parser "auto" is a 400: a LLaDA-style checkpoint has no format that tells a call from text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from dllm.tool_calls import TOOL_CALL_FORMATS

from .protocol import APIError, ChatCompletionRequest, check_schema

# The formats a server parses calls from (its `tool_call_parser`, vLLM's --tool-call-parser): those the training
# data can be written in (pipelines.pack --tool-call-format).
TOOL_CALL_PARSERS = TOOL_CALL_FORMATS


def tool_call(name: str, arguments: str) -> dict:
    """A chat answer's tool call (OpenAI's shape; the arguments are the JSON text of an object)."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


@dataclass(frozen=True)
class ForcedCall:
    """The call a request's tool_choice makes its answer. With one function (`names`), the answer is its arguments,
    held to its parameters; with "required" and several, it is {"<function name>": <its arguments>}, held to `schema`
    (one property of those names, each held to its function's parameters), which `split` takes apart."""
    names: tuple[str, ...]
    schema: dict

    def split(self, text: str, finished: bool) -> tuple[str | None, str]:
        """(function name, arguments text) of an answer or its beginning; the name is None until it is written. An
        unfinished answer's arguments stop before a trailing run of `}` and whitespace, which may close the
        wrapping object: so each is a prefix of the finished answer's (whose wrapper's `}` is dropped)."""
        if len(self.names) == 1:
            return self.names[0], text
        key = text[text.find("{") + 1:].lstrip()  # the wrapper's key, where it is written
        try:
            name, end = json.JSONDecoder().raw_decode(key)
        except ValueError:
            return None, ""
        rest = key[end:].lstrip()
        if not rest.startswith(":") or name not in self.names:
            return None, ""
        arguments = rest[1:].lstrip()
        if not finished:
            return name, arguments.rstrip(" \t\r\n}")
        arguments = arguments.rstrip()
        return name, (arguments[:-1] if arguments.endswith("}") else arguments).rstrip()


class CallStream:
    """One streamed choice's forced call: the answer's text in, block by block; the arguments' new text out."""

    def __init__(self, call: ForcedCall) -> None:
        self.call, self.text, self.name, self.sent = call, "", None, 0

    def feed(self, piece: str, finished: bool) -> str:
        self.text += piece
        self.name, arguments = self.call.split(self.text, finished)
        new, self.sent = arguments[self.sent:], max(self.sent, len(arguments))
        return new


@dataclass(frozen=True)
class ParsedCalls:
    """tool_choice "auto" under a tool-call parser: the calls of the given functions (`names`) the model writes as
    `start` JSON `end` blocks are taken out of its answer. A block is a call where its JSON is {"name": one of the
    functions, "arguments": an object (or its JSON text; left out: {})}; any other block stays in the text as
    written, so nothing the model wrote is lost. Whitespace around a call is dropped. A block the answer ends in
    without its end mark is a call where its JSON is complete (the model stopped, or a stop string cut the mark).
    The arguments are not held to the function's parameters: tool_choice "required" or a named function are."""
    names: tuple[str, ...]
    start: str
    end: str

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, str]]]:
        """A finished answer's (content, calls): content None where calls leave no text but whitespace."""
        stream = ParsedCallStream(self)
        content, calls = stream.feed(text, finished=True)
        return (None if calls and not content.strip() else content), calls

    def call_of(self, block: str) -> tuple[str, str] | None:
        """(name, arguments JSON text) of a block's JSON, or None where it is not a call of a given function."""
        try:
            value = json.loads(block)
        except ValueError:
            return None
        if not isinstance(value, dict) or not set(value) <= {"name", "arguments"} or value.get("name") not in self.names:
            return None
        arguments = value.get("arguments", {})
        if isinstance(arguments, str):
            try:
                if not isinstance(json.loads(arguments), dict):
                    return None
            except ValueError:
                return None
            return value["name"], arguments
        return (value["name"], json.dumps(arguments, ensure_ascii=False)) if isinstance(arguments, dict) else None


class ParsedCallStream:
    """One choice's answer, block by block, split into the text to send and the calls it writes (ParsedCalls).
    What it gives out is final: text that may still turn out to be the whitespace before a call or the beginning of
    a start mark, and an open block, are held back until the text after them decides; so the pieces of a stream
    join into what `ParsedCalls.parse` makes of the whole answer, however the answer is cut."""

    def __init__(self, calls: ParsedCalls) -> None:
        self.calls, self.text, self.done = calls, "", 0  # text[:done] is given out (or dropped)
        self.after_call = False  # whitespace right after a call is dropped

    def feed(self, piece: str, finished: bool) -> tuple[str, list[tuple[str, str]]]:
        """The new text to send and the new calls, after `piece`; `finished`: the answer ends with it."""
        self.text += piece
        start, end = self.calls.start, self.calls.end
        out, calls = [], []
        while True:
            rest = self.text[self.done:]
            if self.after_call:
                kept = rest.lstrip()
                self.done += len(rest) - len(kept)
                if not kept:
                    break
                self.after_call, rest = False, kept
            mark = rest.find(start)
            if mark < 0:  # no block (yet): all but what may still open one
                held = 0 if finished else _held_back(rest, start)
                out.append(rest[:len(rest) - held])
                self.done += len(rest) - held
                break
            before = rest[:mark].rstrip()
            close = rest.find(end, mark + len(start))
            if close < 0 and not finished:  # an open block: wait for its end
                out.append(before)
                self.done += len(before)
                break
            body_end, block_end = (len(rest), len(rest)) if close < 0 else (close, close + len(end))
            call = self.calls.call_of(rest[mark + len(start):body_end])
            if call is None:  # not a call: the block stays in the text, as written
                out.append(rest[:block_end])
            else:
                out.append(before)
                calls.append(call)
                self.after_call = True
            self.done += block_end
        return "".join(out), calls


def _held_back(text: str, start: str) -> int:
    """How many characters at the end of `text` may still be the whitespace before a block or its mark's
    beginning: a trailing proper prefix of `start`, and the whitespace before it."""
    partial = next((k for k in range(len(start) - 1, 0, -1) if text.endswith(start[:k])), 0)
    body = text[:len(text) - partial]
    return partial + len(body) - len(body.rstrip())


def tool_use(req: ChatCompletionRequest, parser: str | None) -> ForcedCall | ParsedCalls | None:
    """What a request's tools make of its answers: a ForcedCall where tool_choice names a function (the answer is its
    arguments, held to its parameters; JSON mode) or is "required" (a call of one of the tools, the model picking
    which by writing its name first); ParsedCalls for "auto" (OpenAI's default where tools are given) on a server
    with a tool-call `parser` (TOOL_CALL_PARSERS); None for a text answer ("none", or no tools)."""
    functions = tool_functions(req.tools or [])
    choice = req.tool_choice
    if choice is None or choice == "auto":
        if not functions:
            return None
        if parser is None:
            raise APIError(400, "tool_choice 'auto' (the default where tools are given) needs a server started with "
                                f"a tool-call parser (tool_call_parser: one of {sorted(TOOL_CALL_PARSERS)}), for a "
                                "model trained to write calls in its format; this one has none. Name a function "
                                "(tool_choice {\"type\": \"function\", \"function\": {\"name\": ...}}) or give "
                                "'required' (a call of one of the tools) or 'none'", param="tool_choice",
                           code="unsupported_parameter")
        return ParsedCalls(tuple(functions), *TOOL_CALL_PARSERS[parser])
    if choice == "none":
        return None
    if not functions:
        raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
    if choice == "required":
        held = _held(functions, list(functions))
        if len(held) == 1:
            return ForcedCall(tuple(held), next(iter(held.values())))
        return ForcedCall(tuple(held), {"type": "object", "properties": held, "additionalProperties": False,
                                        "minProperties": 1, "maxProperties": 1, **_shared_definitions(held)})
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        name = choice["function"]["name"]
        if name not in functions:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not among the tools "
                                f"{sorted(functions)}", param="tool_choice", code="invalid_value")
        return ForcedCall((name,), _held(functions, [name])[name])
    raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                        "\"function\": {\"name\": ...}}", param="tool_choice", code="invalid_value")


def tool_functions(tools: list) -> dict[str, dict]:
    """Each function tool's name -> its parameters' schema (OpenAI's: no parameters, no arguments), in the tools'
    order; a tool that is not a named function is a 400."""
    functions = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                "\"parameters\": {...}}}: function tools only", param="tools", code="invalid_value")
        if fn["name"] in functions:
            raise APIError(400, f"tools[{i}] repeats the function name {fn['name']!r}", param="tools",
                           code="invalid_value")
        functions[fn["name"]] = fn.get("parameters", {"type": "object", "properties": {}})
    return functions


def _held(functions: dict[str, dict], names: list[str]) -> dict[str, dict]:
    """The named functions' parameters, checked as a forced call's arguments are held to them: a keyword they would
    not be held to is a 400 that names it and where it is (parsed calls are not held, so not checked)."""
    index = {name: i for i, name in enumerate(functions)}
    for name in names:
        check_schema(functions[name], f"tools[{index[name]}].function.parameters", "tools")
    return {name: functions[name] for name in names}


def _shared_definitions(functions: dict[str, dict]) -> dict:
    """The functions' parameters' $defs / definitions, gathered at the root of the schema that holds them all (where
    their $refs point); a name that two functions define differently is a 400."""
    shared: dict[str, dict] = {}
    for name, schema in functions.items():
        for key in ("$defs", "definitions"):
            for def_name, sub in schema.get(key, {}).items():
                if shared.setdefault(key, {}).setdefault(def_name, sub) != sub:
                    raise APIError(400, f"the tools' parameters define {key}/{def_name} differently ({name!r} and an "
                                        "earlier function); tool_choice 'required' holds them in one schema: name the "
                                        "function to call", param="tool_choice", code="unsupported_parameter")
    return shared


def chat_message(text: str, tools: ForcedCall | ParsedCalls | None, finish_reason: str) -> tuple[dict, str]:
    """A finished chat answer's message and finish reason: the call a forced one makes of it (an answer cut before
    the function's name is written, which only max_tokens does, is left as its text); the calls parsed out of it,
    finishing for "tool_calls" where it stopped (not where max_tokens cut it); else its text."""
    if isinstance(tools, ForcedCall):
        name, arguments = tools.split(text, finished=True)
        if name is not None:
            return {"role": "assistant", "content": None, "tool_calls": [tool_call(name, arguments)]}, finish_reason
    elif isinstance(tools, ParsedCalls):
        content, calls = tools.parse(text)
        if calls:
            return ({"role": "assistant", "content": content, "tool_calls": [tool_call(*c) for c in calls]},
                    "tool_calls" if finish_reason == "stop" else finish_reason)
    return {"role": "assistant", "content": text}, finish_reason


class ChatDeltas:
    """One streamed chat choice: each piece of its answer as a delta's fields (OpenAI's streaming shapes), so that the
    deltas join into chat_message's message. A forced call: its id and name in the first delta once the name is
    written, its arguments' text in pieces after; parsed calls: the text between them as content, each call whole
    (id, name and arguments) once its block ends; no tools: the text as content."""

    def __init__(self, tools: ForcedCall | ParsedCalls | None) -> None:
        self.forced = CallStream(tools) if isinstance(tools, ForcedCall) else None
        self.parsed = ParsedCallStream(tools) if isinstance(tools, ParsedCalls) else None
        self.named = False  # the forced call's id and name are sent
        self.calls = 0  # parsed calls sent

    def feed(self, piece: str, finished: bool) -> dict:
        if self.forced is not None:
            arguments = self.forced.feed(piece, finished)
            if self.forced.name is None:
                return {}
            if not self.named:
                self.named = True
                return {"tool_calls": [{"index": 0, **tool_call(self.forced.name, arguments)}]}
            return {"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]} if arguments else {}
        if self.parsed is None:
            return {"content": piece} if piece else {}
        content, calls = self.parsed.feed(piece, finished)
        delta: dict = {"content": content} if content else {}
        if calls:
            delta["tool_calls"] = [{"index": self.calls + k, **tool_call(*c)} for k, c in enumerate(calls)]
            self.calls += len(calls)
        return delta

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls and reason == "stop" else reason
