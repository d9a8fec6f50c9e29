"""Ray Data job: read instruction data -> tokenise (actor pool) -> multi-sample packing -> parquet.

    python -m pipelines.pack --input 'data/*.jsonl' --tokenizer CKPT_DIR --output packed/ --seq-len 8192

Input: jsonl or parquet files (local paths or any pyarrow/fsspec URI such as s3://bucket/x.jsonl), in
Alpaca style (`instruction`, `input`, `output`), chat style (`messages`: [{role, content}, ...],
the last one the assistant's answer; OpenAI's function calling too: a record's `tools`, assistant
`tool_calls` written as --tool-call-format says, `tool` results) or ShareGPT style (`conversations`: [{from, value}, ...], from
human / gpt / system; read as chat style). A chat record's sample is its last assistant turn, or
with --all-turns every assistant turn, the conversation before it as the prompt. Without
--chat-template a sample is the dLLM-Var concatenation (prompt = instruction + input, response =
output + EOS); with it, the tokenizer's chat template wraps the prompt and the response ends with
EOT. --eos-pad N follows each response with 0-N extra EOS tokens (dllm.eos_padded; the count drawn
from the record's file name, line and turn, so every run writes the same rows).

--holdout-fraction F --holdout-output DIR sets a fraction of the records aside as held-out rows (the
train config's `eval_data`), packed the same way into their own directory. A record's side is drawn
from its file name and line, so every run splits alike; all samples of a record fall on one side.

Output: parquet rows of `seq_len` tokens with `input_ids`, `prompt_mask`, `segment_ids` (what
`train` reads), and `stats.json`: records and samples read, samples packed / dropped by reason (with the first few bad
lines by file and line), tokens in and out, packing efficiency, rows written. Re-running overwrites
the output. A bad line never stops the job and never costs another sample.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

import dllm
from dllm.packing import PACK_MODES, pack_samples
from dllm.tool_calls import TOOL_CALL_FORMATS, render_tool_calls

from .runtime import ensure_ray, progress_bars_wanted

ERROR_KINDS = ("malformed_json", "missing_field", "wrong_type", "empty_response", "too_long")
NO_SPLIT_REPACK_BELOW = 0.98  # rows filled less than this are repacked across batches at the end


class PipelineError(RuntimeError):
    """A problem that stops the job before it starts (no input, no tokenizer, unwritable output)."""


@dataclass
class PackOptions:
    inputs: list[str]
    output: str
    tokenizer: str
    seq_len: int = 8192
    mode: str = "concat"
    chat_template: bool = False
    max_sample_len: int | None = None  # default: seq_len (dLLM-Var drops samples >= the row length)
    num_tokenizers: int = 2
    pack_batch_size: int = 4096
    address: str | None = None
    examples_shown: int = 5
    eos_pad: int = 0  # the most extra EOS tokens after each response (0 = none)
    all_turns: bool = False  # chat records: a sample per assistant turn (default: the last turn only)
    holdout_fraction: float = 0.0  # records set aside as held-out rows, packed into holdout_output
    holdout_output: str | None = None
    tool_call_format: str | None = None  # how assistant turns' tool_calls are written (dllm.tool_calls)

    def __post_init__(self) -> None:
        if self.mode not in PACK_MODES:
            raise PipelineError(f"--mode must be one of {list(PACK_MODES)}, got {self.mode!r}")
        if self.tool_call_format is not None and self.tool_call_format not in TOOL_CALL_FORMATS:
            raise PipelineError(f"--tool-call-format must be one of {list(TOOL_CALL_FORMATS)}, got "
                                f"{self.tool_call_format!r}")
        if self.seq_len < 8:
            raise PipelineError(f"--seq-len must be at least 8, got {self.seq_len}")
        if self.eos_pad < 0:
            raise PipelineError(f"--eos-pad is the most extra EOS tokens per response: >= 0 (0 = none), got {self.eos_pad}")
        if self.max_sample_len is None:
            self.max_sample_len = self.seq_len
        if not 0 <= self.holdout_fraction < 1:
            raise PipelineError(f"--holdout-fraction must be in [0, 1), got {self.holdout_fraction}")
        if (self.holdout_fraction > 0) != (self.holdout_output is not None):
            raise PipelineError("--holdout-fraction and --holdout-output go together: the fraction of records held "
                                "out, and the directory their rows are written to")
        if self.holdout_output is not None:
            out, held = (os.path.normpath(d).rstrip("/") for d in (self.output, self.holdout_output))
            if held == out or held.startswith(out + "/") or out.startswith(held + "/"):
                raise PipelineError(f"--holdout-output {self.holdout_output} must lie outside --output {self.output} "
                                    "(and not contain it): training reads every parquet file under its directory")


def record_key(source: str, position: int) -> str:
    """A record's stable name, its file name and line: what EOS padding and the held-out split draw from,
    so that every run and every mount of the same files writes the same rows."""
    return f"{os.path.basename(str(source))}:{position}"


def held_out(source: str, position: int, fraction: float) -> bool:
    """Whether the record at line `position` of `source` is held out: drawn from its record_key with
    crc32 (not Python's per-process salted hash)."""
    return fraction > 0 and zlib.crc32(record_key(source, position).encode()) / 2**32 < fraction


# ----- stage 1: files -> records (one per line / row), malformed ones kept as errors ------------

def parse_file(row: dict) -> list[dict]:
    path, data = row["path"], row["bytes"]
    out = []
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(io.BytesIO(data)).to_pylist(), start=1):
            out.append({"source": path, "position": i, "record": json.dumps(rec, default=str), "error_kind": "",
                        "error": ""})
        return out
    for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
            out.append({"source": path, "position": i, "record": line, "error_kind": "", "error": ""})
        except json.JSONDecodeError as e:
            out.append({"source": path, "position": i, "record": line, "error_kind": "malformed_json",
                        "error": f"malformed JSON: {e.msg} at column {e.colno}"})
    return out


# ----- stage 2: records -> token ids (actor pool, one tokenizer per actor) ----------------------

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def sharegpt_messages(conversations) -> list[dict]:
    """ShareGPT turns [{from, value}, ...] as chat messages [{role, content}, ...]."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("wrong_type", "'conversations' must be a non-empty list of {from, value} turns")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError("wrong_type", f"conversations[{i}] must be a {{from, value}} turn with a string value")
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError("wrong_type", f"conversations[{i}].from is {turn.get('from')!r}; "
                                           f"allowed: {sorted(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def conversation_prompt(tok, chat: bool, context: list[dict], tools: list | None = None) -> str:
    """A conversation as the prompt that answers it: the tokenizer's chat template with its generation prompt (and
    the record's tools, for a template that shows them), or (dLLM-Var's concatenation, without a template) the
    messages' contents joined."""
    if chat:
        return tok.apply_chat_template(context, tokenize=False, add_generation_prompt=True, tools=tools or None)
    return "".join(m["content"] for m in context)


def record_texts(rec, chat_prompt: Callable[..., str], chat: bool, all_turns: bool = False,
                 answered: bool = True, tool_format: str | None = None) -> list[tuple[str, str | None]]:
    """A record's samples as (prompt text, answer text); raises ValueError(kind, message) for a bad record.

    chat_prompt(context, tools) renders a conversation as a prompt (the chat template, or the contents joined);
    `chat` wraps an Alpaca record's instruction + input as a user message. answered=False reads generation input: a
    chat record may end with a user turn and an Alpaca record may lack its `output`, whose answer is then None (the
    last assistant turn, where there is one, is the sample's reference answer).

    Function calling (OpenAI's shapes): a chat record's `tools` go to the chat template; an assistant turn's
    `tool_calls` (its content then may be null) is answered as a model trained in `tool_format`
    (dllm.tool_calls.TOOL_CALL_FORMATS) writes calls, the format the server parses them from (its tool_call_parser);
    in the prompt, earlier turns' calls go to the template as they are (without one: written in the format), and so
    do `tool` turns' results.
    """
    if not isinstance(rec, dict):
        raise ValueError("wrong_type", f"a record must be a JSON object, got {type(rec).__name__}")
    if "conversations" in rec and "messages" not in rec:
        rec = {"messages": sharegpt_messages(rec["conversations"])}
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and (
                    isinstance(m.get("content"), str) or (m.get("content") is None and m.get("tool_calls")))
                for m in msgs):
            raise ValueError("wrong_type", "'messages' must be a non-empty list of {role, content} strings (content "
                                           "may be null in an assistant turn with tool_calls)")
        tools = rec.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise ValueError("wrong_type", "field 'tools' must be a list of function tools")
        if tools and not chat:
            raise ValueError("wrong_type", "a record's tools are shown to the model by the chat template: give "
                                           "--chat-template")
        texts = [_turn_text(m, k, tool_format) if m.get("tool_calls") and not chat else (m.get("content") or "")
                 for k, m in enumerate(msgs)]
        context = [{**m, "content": text} for m, text in zip(msgs, texts)] if chat else \
            [{"role": m["role"], "content": text} for m, text in zip(msgs, texts)]
        if msgs[-1]["role"] != "assistant":
            if answered:
                raise ValueError("missing_field", "the last message must be the assistant's answer")
            return [(chat_prompt(context, tools), None)]
        turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant" and k > 0] if all_turns \
            else [len(msgs) - 1]
        return [(chat_prompt(context[:k], tools), _turn_text(msgs[k], k, tool_format)) for k in turns]
    for key in ("instruction", "output") if answered else ("instruction",):
        if key not in rec:
            raise ValueError("missing_field", f"missing field '{key}'")
    instruction, extra, answer = rec["instruction"], rec.get("input"), rec.get("output")
    extra = "" if extra is None else extra
    fields = [("instruction", instruction), ("input", extra)]
    if answered or answer is not None:  # generation input may leave its output out
        fields.append(("output", answer))
    bad = next((key for key, value in fields if not isinstance(value, str)), None)
    if bad is not None:
        raise ValueError("wrong_type", f"field '{bad}' must be a string")
    if chat:
        user = instruction + (("\n\n" + extra) if extra else "")
        return [(chat_prompt([{"role": "user", "content": user}], None), answer)]
    return [(instruction + extra, answer)]


def _turn_text(message: dict, index: int, tool_format: str | None) -> str:
    """An assistant turn's text as the model writes it: its content, and its tool_calls in `tool_format`."""
    if not message.get("tool_calls"):
        return message["content"]
    if tool_format is None:
        raise ValueError("wrong_type", f"messages[{index}] calls tools: give --tool-call-format, the format the model "
                                       f"learns to write calls in (one of {', '.join(TOOL_CALL_FORMATS)}; serve it "
                                       "with the same tool_call_parser)")
    if not isinstance(message["tool_calls"], list):
        raise ValueError("wrong_type", f"messages[{index}].tool_calls must be a list of calls")
    try:
        return render_tool_calls(message.get("content"), message["tool_calls"], tool_format)
    except ValueError as e:
        raise ValueError("wrong_type", f"messages[{index}].{e}") from e


def error_of(ex: ValueError) -> tuple[str, str]:
    """(kind, message) of a ValueError raised as ValueError(kind, message), else a wrong_type."""
    return ex.args if len(ex.args) == 2 else ("wrong_type", str(ex))


class Tokenize:
    """Records -> one row per sample (prompt ids, response ids), or one row per bad record / sample
    with its error kind. A chat record gives a sample per assistant turn with `all_turns`."""

    def __init__(self, tokenizer_dir: str, chat_template: bool, max_sample_len: int, eos_pad: int = 0,
                 all_turns: bool = False, holdout_fraction: float = 0.0, tool_call_format: str | None = None) -> None:
        self.holdout_fraction = holdout_fraction
        self.tool_call_format = tool_call_format
        self.tok = dllm.load_tokenizer(tokenizer_dir)
        self.chat = chat_template
        self.max_len = max_sample_len
        self.eos_pad = eos_pad
        self.all_turns = all_turns
        self.eos = self.tok.eos_token_id
        self.eot = self.tok.eot_token_id if self.tok.eot_token_id is not None else self.eos

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def texts(self, rec) -> list[tuple[str, str]]:
        """The record's samples as (prompt text, answer text); raises ValueError(kind, message) for a
        bad record."""
        return record_texts(rec, self._chat_prompt, self.chat, all_turns=self.all_turns,
                            tool_format=self.tool_call_format)

    def _chat_prompt(self, context: list[dict], tools: list | None) -> str:
        return conversation_prompt(self.tok, self.chat, context, tools)

    def sample(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids + EOS/EOT) or raises ValueError(kind, message)."""
        if not answer.strip():
            raise ValueError("empty_response", "the response is empty")
        prompt_ids = self.encode(prompt)
        response_ids = self.encode(answer) + [self.eot if self.chat else self.eos]
        n = len(prompt_ids) + len(response_ids)
        if n > self.max_len:
            raise ValueError("too_long", f"{n} tokens, longer than the limit of {self.max_len}")
        return prompt_ids, response_ids

    def _rows(self, rec: str, kind: str, err: str | None) -> list[tuple[list[int], list[int], str, str]]:
        """(prompt ids, response ids, error kind, error) per sample of a record: a bad record is one
        row with its error, and so is a bad sample of a good one."""
        if kind:
            return [([], [], str(kind), "" if err is None else str(err))]
        try:
            texts = self.texts(json.loads(rec))
        except ValueError as ex:
            return [([], [], *error_of(ex))]
        rows = []
        for prompt, answer in texts:
            try:
                rows.append((*self.sample(prompt, answer), "", ""))
            except ValueError as ex:
                rows.append(([], [], *error_of(ex)))
        return rows

    def __call__(self, batch: dict) -> pa.Table:
        sources, positions, turns, prompts, responses, padding, kinds, errors = [], [], [], [], [], [], [], []
        holdout = []
        for rec, kind, err, source, position in zip(batch["record"], batch["error_kind"], batch["error"],
                                                    batch["source"], batch["position"]):
            aside = held_out(source, int(position), self.holdout_fraction)
            for turn, (p, r, k, e) in enumerate(self._rows(rec, kind, err)):
                holdout.append(aside)
                n = len(r)
                if not k and self.eos_pad:  # keyed by file name, line (and turn): the same on every run and mount
                    key = record_key(source, position) + (f":{turn}" if turn else "")
                    r = dllm.eos_padded(r, self.eos, self.eos_pad, key=key, room=self.max_len - len(p) - len(r))
                sources.append(str(source))
                positions.append(int(position))
                turns.append(turn)
                prompts.append(p)
                responses.append(r)
                padding.append(len(r) - n)
                kinds.append(k)
                errors.append(e)
        return pa.table({
            "source": pa.array(sources, type=pa.string()),
            "position": pa.array(positions, type=pa.int64()),
            "turn": pa.array(turns, type=pa.int64()),
            "prompt_ids": pa.array(prompts, type=pa.list_(pa.int64())),
            "response_ids": pa.array(responses, type=pa.list_(pa.int64())),
            "eos_padding": pa.array(padding, type=pa.int64()),
            "error_kind": pa.array(kinds),
            "error": pa.array(errors),
            "held_out": pa.array(holdout, type=pa.bool_()),
        })


def summarize_batch(batch: pa.Table, keep: int) -> dict:
    """Per-batch counts for stats.json (reduced on the driver; no shuffle needed)."""
    kinds = batch.column("error_kind").to_pylist()
    aside = batch.column("held_out").to_pylist()
    counts: dict[str, int] = {}
    bad = []
    for i, kind in enumerate(kinds):
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
            bad.append((batch.column("source")[i].as_py(), batch.column("position")[i].as_py(),
                        batch.column("error")[i].as_py()))
    lengths = [len(p) + len(r) for p, r in zip(batch.column("prompt_ids").to_pylist(),
                                               batch.column("response_ids").to_pylist())]
    tokens = sum(n for n, k in zip(lengths, kinds) if not k)
    held_tokens = sum(n for n, k, a in zip(lengths, kinds, aside) if a and not k)
    padding = sum(batch.column("eos_padding").to_pylist())
    records = batch.column("turn").to_pylist().count(0)  # a record's first sample (or its error row)
    return {"tokens": np.array([tokens]), "eos_padding": np.array([padding]), "records": np.array([records]),
            "held_out_samples": np.array([sum(a and not k for a, k in zip(aside, kinds))]),
            "held_out_tokens": np.array([held_tokens]),
            "dropped": np.array([json.dumps(counts)]),
            "examples": np.array([json.dumps(sorted(bad)[:keep])])}


# ----- stage 3: samples -> packed rows (stateless per batch; tails repacked at the end) --------

ROW_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int64())), ("prompt_mask", pa.list_(pa.bool_())),
    ("segment_ids", pa.list_(pa.int32())), ("tail_prompt", pa.list_(pa.int64())),
    ("tail_response", pa.list_(pa.int64())), ("is_tail", pa.bool_()),
])


def rows_table(rows: dllm.PackedRows, tail: list[tuple[list[int], list[int]]]) -> pa.Table:
    n, t = rows.num_rows, len(tail)
    return pa.table({
        "input_ids": [r.tolist() for r in rows.input_ids] + [[]] * t,
        "prompt_mask": [r.tolist() for r in rows.prompt_mask] + [[]] * t,
        "segment_ids": [r.tolist() for r in rows.segment_ids] + [[]] * t,
        "tail_prompt": [[]] * n + [list(p) for p, _ in tail],
        "tail_response": [[]] * n + [list(r) for _, r in tail],
        "is_tail": [False] * n + [True] * t,
    }, schema=ROW_SCHEMA)


def pack_batch(batch: pa.Table, seq_len: int, mode: str, pad_token_id: int) -> pa.Table:
    samples = list(zip(batch.column("prompt_ids").to_pylist(), batch.column("response_ids").to_pylist()))
    if mode == "concat":
        packed = pack_samples(samples, seq_len, mode="concat", pad_token_id=pad_token_id, keep_tail=True)
        return rows_table(packed, packed.tail)
    packed = pack_samples(samples, seq_len, mode="no_split", pad_token_id=pad_token_id)
    # Under-filled rows go back as samples, to be packed with other batches' leftovers.
    fill = (packed.segment_ids > 0).mean(axis=1)
    keep = fill >= NO_SPLIT_REPACK_BELOW
    tail = []
    for row in np.nonzero(~keep)[0]:
        seg, ids, pm = packed.segment_ids[row], packed.input_ids[row], packed.prompt_mask[row]
        for s in range(1, int(seg.max()) + 1):
            sel = seg == s
            tail.append((ids[sel & pm].tolist(), ids[sel & ~pm].tolist()))
    kept = dllm.PackedRows(packed.input_ids[keep], packed.prompt_mask[keep], packed.segment_ids[keep])
    return rows_table(kept, tail)


# ----- the job ----------------------------------------------------------------------------------

def expand_inputs(inputs: list[str]) -> list[str]:
    paths = []
    for item in inputs:
        if "://" in item:
            paths.append(item)
            continue
        matched = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        for m in matched:
            if os.path.isdir(m):
                paths += sorted(os.path.join(m, f) for f in os.listdir(m) if f.endswith((".jsonl", ".json", ".parquet")))
            elif os.path.isfile(m):
                paths.append(m)
    if not paths:
        raise PipelineError(f"no input files match {inputs}; give jsonl/parquet files, directories or globs")
    unsupported = [p for p in paths if not p.endswith((".jsonl", ".json", ".parquet"))]
    if unsupported:
        raise PipelineError(f"unsupported input file(s) {unsupported[:3]}: use .jsonl, .json (lines) or .parquet")
    return paths


def check_output(output: str) -> None:
    if "://" in output:
        return  # remote filesystems report permission problems at write time
    try:
        os.makedirs(output, exist_ok=True)
        probe = os.path.join(output, ".write-probe")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PipelineError(f"cannot write to output directory {output}: {e.strerror or e}") from e


def run_pack(opts: PackOptions) -> dict:
    """Run the pipeline; returns the stats dict that is also written as `stats.json`."""
    t0 = time.time()
    paths = expand_inputs(opts.inputs)
    try:
        tok = dllm.load_tokenizer(opts.tokenizer)
    except Exception as e:
        raise PipelineError(f"cannot load the tokenizer from {opts.tokenizer}: {e}") from e
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    check_output(opts.output)
    if opts.holdout_output is not None:
        check_output(opts.holdout_output)

    ray = ensure_ray(opts.address)
    from ray.data import ActorPoolStrategy, DataContext
    from ray.data.expressions import col

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress_bars_wanted()
    ctx.enable_operator_progress_bars = progress_bars_wanted()

    # Tokenizer actors each hold a CPU; leave one for the read tasks or the job deadlocks.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    pool = max(1, min(opts.num_tokenizers, cpus - 1))
    records = ray.data.read_binary_files(paths, include_paths=True).flat_map(parse_file)
    tokenized = records.map_batches(
        Tokenize, fn_constructor_kwargs={"tokenizer_dir": str(opts.tokenizer), "chat_template": opts.chat_template,
                                          "max_sample_len": opts.max_sample_len, "eos_pad": opts.eos_pad,
                                          "all_turns": opts.all_turns, "holdout_fraction": opts.holdout_fraction,
                                          "tool_call_format": opts.tool_call_format},
        batch_size=256, compute=ActorPoolStrategy(min_size=1, max_size=pool), batch_format="numpy",
    ).materialize()
    samples_read = tokenized.count()  # samples, and bad records (a row each)
    if samples_read == 0:
        raise PipelineError(f"the input {paths} holds no records")

    dropped = {k: 0 for k in ERROR_KINDS}
    bad_rows, tokens_in, eos_padding, records_read, held_samples, held_tokens = [], 0, 0, 0, 0, 0
    for part in tokenized.map_batches(summarize_batch, batch_format="pyarrow", batch_size=4096,
                                      fn_kwargs={"keep": opts.examples_shown}).take_all():
        tokens_in += part["tokens"]
        eos_padding += part["eos_padding"]
        records_read += int(part["records"])
        held_samples += int(part["held_out_samples"])
        held_tokens += int(part["held_out_tokens"])
        for kind, n in json.loads(part["dropped"]).items():
            dropped[kind] += n
        bad_rows += json.loads(part["examples"])
    examples = [f"{src}:{pos}: {err}" for src, pos, err in sorted(bad_rows)[: opts.examples_shown]]

    good = tokenized.filter(expr=col("error_kind") == "")  # expressions run vectorised, not per row in Python
    rows_written, tokens_out = _pack_and_write(ray, good.filter(expr=~col("held_out")), opts.output, opts, pad_id)
    held = None
    if opts.holdout_output is not None:
        held_rows, held_out_tokens = _pack_and_write(ray, good.filter(expr=col("held_out")), opts.holdout_output,
                                                     opts, pad_id)
        held = {"output": opts.holdout_output, "fraction": opts.holdout_fraction, "samples": held_samples,
                "rows_written": held_rows, "tokens": held_out_tokens}
        if held_out_tokens != held_tokens:
            raise RuntimeError(f"held-out token count not conserved: {held_tokens} in, {held_out_tokens} out")
    stats = {
        "inputs": paths, "output": opts.output, "mode": opts.mode, "seq_len": opts.seq_len,
        "chat_template": opts.chat_template, "tool_call_format": opts.tool_call_format,
        "records_read": records_read, "samples_read": samples_read,
        "samples_packed": samples_read - sum(dropped.values()) - held_samples, "dropped": dropped,
        "dropped_examples": examples, "tokens_in": tokens_in, "eos_padding_tokens": int(eos_padding),
        "tokens_out": tokens_out,
        "rows_written": rows_written,
        "packing_efficiency": tokens_out / max(1, rows_written * opts.seq_len),
        "held_out": held,
        "seconds": round(time.time() - t0, 2), "options": asdict(opts),
    }
    if tokens_in - held_tokens != tokens_out:  # a bug, never a data problem: refuse to report success
        raise RuntimeError(f"token count not conserved: {tokens_in - held_tokens} in, {tokens_out} out")
    write_stats(opts.output, stats)
    if held is not None:
        write_stats(opts.holdout_output, stats)
    return stats


def _pack_and_write(ray, good, output: str, opts: PackOptions, pad_id: int) -> tuple[int, int]:
    """Pack the samples of `good` into rows and write them to `output` (overwritten); returns (rows, tokens)."""
    from ray.data import SaveMode
    from ray.data.expressions import col

    packed = good.map_batches(pack_batch, batch_size=opts.pack_batch_size, batch_format="pyarrow",
                              fn_kwargs={"seq_len": opts.seq_len, "mode": opts.mode, "pad_token_id": pad_id}).materialize()
    rows = packed.filter(expr=~col("is_tail")).select_columns(["input_ids", "prompt_mask", "segment_ids"])
    tails = [(r["tail_prompt"], r["tail_response"]) for r in
             packed.filter(expr=col("is_tail")).select_columns(["tail_prompt", "tail_response"]).take_all()]
    if tails:  # the leftovers of every batch, packed once: only the very last row is padded
        last = pack_samples([(list(p), list(r)) for p, r in tails], opts.seq_len, mode=opts.mode, pad_token_id=pad_id)
        last_ds = ray.data.from_arrow(rows_table(last, []).select(["input_ids", "prompt_mask", "segment_ids"]))
        rows = rows.union(last_ds) if rows.count() else last_ds
    rows = rows.materialize()
    rows.write_parquet(output, mode=SaveMode.OVERWRITE)
    tokens = sum(int(np.count_nonzero(np.concatenate(b.column("segment_ids").to_numpy(zero_copy_only=False))))
                 for b in rows.iter_batches(batch_format="pyarrow", batch_size=1024))
    return rows.count(), tokens


def write_stats(output: str, stats: dict) -> None:
    text = json.dumps(stats, indent=2)
    if "://" in output:
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(output)
        with fs.open_output_stream(path.rstrip("/") + "/stats.json") as f:
            f.write(text.encode())
    else:
        with open(os.path.join(output, "stats.json"), "w") as f:
            f.write(text)


def summary(stats: dict) -> str:
    read = f"{stats['records_read']} records ({stats['samples_read']} samples)" \
        if stats["records_read"] != stats["samples_read"] else f"{stats['samples_read']} samples"
    lines = [f"read {read}, packed {stats['samples_packed']} into {stats['rows_written']} "
             f"rows of {stats['seq_len']} ({stats['packing_efficiency']:.2%} real tokens, {stats['tokens_out']} tokens) "
             f"in {stats['seconds']}s -> {stats['output']}"]
    if stats["held_out"]:
        h = stats["held_out"]
        lines.append(f"held out {h['samples']} samples ({h['fraction']:.0%} of the records) in {h['rows_written']} rows "
                     f"-> {h['output']}")
    if stats["eos_padding_tokens"]:
        lines.append(f"EOS padding: {stats['eos_padding_tokens']} extra EOS tokens (0-{stats['options']['eos_pad']} "
                     f"per response)")
    dropped = {k: v for k, v in stats["dropped"].items() if v}
    if dropped:
        lines.append(f"dropped: {dropped}")
        lines += [f"  {e}" for e in stats["dropped_examples"]]
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m pipelines.pack", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", "-i", nargs="+", required=True,
                   help="jsonl/parquet files, directories or globs; local paths or URIs (s3://, gs://, ...)")
    p.add_argument("--output", "-o", required=True, help="output directory for parquet shards + stats.json (overwritten)")
    p.add_argument("--tokenizer", required=True, help="checkpoint or tokenizer directory holding tokenizer.json")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per packed row (dLLM-Var: 8192)")
    p.add_argument("--mode", choices=PACK_MODES, default="concat",
                   help="concat: the paper's stream packing, samples may straddle rows (default); "
                        "no_split: each sample whole in one row, tails padded")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap prompts in the tokenizer's chat template and end responses with EOT "
                        "(default: dLLM-Var concatenation, responses end with EOS)")
    p.add_argument("--max-sample-len", type=int, help="drop samples longer than this many tokens (default: --seq-len)")
    p.add_argument("--eos-pad", type=int, default=0,
                   help="follow each response with 0-N extra EOS tokens, always masked in training: masks past every "
                        "answer that learn to say EOS (default 0 = none; the quickstart uses 8; see README)")
    p.add_argument("--all-turns", action="store_true",
                   help="chat records: train every assistant turn, each with the conversation before it as its prompt "
                        "(default: the last turn only)")
    p.add_argument("--tool-call-format", choices=TOOL_CALL_FORMATS,
                   help="chat records with OpenAI tool_calls: the assistant turns' calls written as the model learns "
                        "to write them (hermes: <tool_call> JSON blocks); serve the model with the same "
                        "tool_call_parser, for tool_choice 'auto' (default: such records are counted bad rows)")
    p.add_argument("--holdout-fraction", type=float, default=0.0,
                   help="fraction of the records set aside as held-out rows (the train config's eval_data), each "
                        "record's side drawn from its file name and line (default 0: none)")
    p.add_argument("--holdout-output", help="directory for the held-out rows (with --holdout-fraction; outside --output)")
    p.add_argument("--num-tokenizers", type=int, default=2, help="tokenizer actors in the pool")
    p.add_argument("--pack-batch-size", type=int, default=4096, help="samples packed together per task")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    return p


def options_from_args(args: argparse.Namespace) -> PackOptions:
    return PackOptions(inputs=args.input, output=args.output, tokenizer=args.tokenizer, seq_len=args.seq_len,
                       mode=args.mode, chat_template=args.chat_template, max_sample_len=args.max_sample_len,
                       num_tokenizers=args.num_tokenizers, pack_batch_size=args.pack_batch_size, address=args.address,
                       eos_pad=args.eos_pad, all_turns=args.all_turns, holdout_fraction=args.holdout_fraction,
                       holdout_output=args.holdout_output, tool_call_format=args.tool_call_format)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        stats = run_pack(options_from_args(args))
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
