"""Tool-call formats: how a model trained to call functions writes a call in its answer text.

One place for both sides of the convention: the training data renders an assistant turn's calls in a format
(pipelines.pack --tool-call-format), and the server parses the same format out of the model's answers
(serve.tools, `tool_call_parser`). A call is JSON {"name": ..., "arguments": {...}} between a start and an end mark.
"""

from __future__ import annotations

import json

# "hermes": Hermes / Qwen 2.5's blocks, <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>
TOOL_CALL_FORMATS = {"hermes": ("<tool_call>", "</tool_call>")}


def render_tool_calls(content: str | None, tool_calls: list, fmt: str) -> str:
    """An assistant turn's text as a model trained in format `fmt` writes it: its content, then each call (OpenAI's
    {"type": "function", "function": {"name", "arguments"}}, the arguments an object or its JSON text) as a block,
    one per line. Raises ValueError naming what is wrong with a call."""
    if fmt not in TOOL_CALL_FORMATS:
        raise ValueError(f"tool-call format {fmt!r} is not one of {', '.join(TOOL_CALL_FORMATS)}")
    start, end = TOOL_CALL_FORMATS[fmt]
    blocks = []
    for i, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tool_calls[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                             "\"arguments\": ...}}")
        arguments = fn.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError as e:
                raise ValueError(f"tool_calls[{i}].function.arguments is not JSON: {e}") from e
        if not isinstance(arguments, dict):
            raise ValueError(f"tool_calls[{i}].function.arguments must be a JSON object")
        call_json = json.dumps({"name": fn["name"], "arguments": arguments}, ensure_ascii=False)
        blocks.append(f"{start}\n{call_json}\n{end}")
    return "\n".join(([content] if content else []) + blocks)
