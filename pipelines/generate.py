"""Ray Data job: answer every record of a dataset with engine replicas (offline batch inference) -> parquet / jsonl.

    python -m pipelines.generate --model CKPT --input 'data/*.jsonl' --output answers/ [--chat-template]
        [--decoder hierarchical --block-size 32 --max-tokens 256] [--replicas 2 --gpus-per-replica 1]
    dllm batch ...   (the same job)

Input, jsonl or parquet as `pipelines.pack` reads it: `{"prompt": text}` (decoded as it is), Alpaca records
(`instruction` + `input`; an `output` is the reference answer), chat `messages` or ShareGPT `conversations` (the
conversation to answer; a final assistant turn is the reference). With --chat-template, chat and Alpaca prompts
are wrapped in the tokenizer's chat template, as `pack --chat-template` wraps them for training; without it they
are joined as dLLM-Var's training concatenation. So a held-out file of training data scores as it was trained.
A record's own `max_tokens`, `temperature`, `top_p`, `top_k`, `min_p`, `seed`, `stop`, `stop_token_ids`,
`min_tokens`, `ignore_eos`, the three penalties (vLLM's names: RECORD_OVERRIDES) or `response_format` (OpenAI's shape:
{"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": {...}}} or {"type": "text"}) override the
job's flags for it. With --json every answer is one JSON object (JSON mode, dllm.engine.json_mode), with
--json-schema FILE one held to that schema; a vocabulary that cannot write one, or a schema with keywords answers
would not be held to, is refused before any work (a record's own: that record's invalid_value).

Every input record is one output row, a bad one too: `source`, `line`, `record` (the input as JSON), `prompt`,
`reference`, `generated_text`, `finish_reason`, `prompt_tokens`, `completion_tokens`, `forwards`, `exact_match`
(the answer equals the reference; null without one), `error_kind` / `error` (malformed_json, missing_field,
wrong_type, invalid_value: an override out of range, too_long: the engine cannot fit the prompt). `stats.json`:
records, answered, errors by kind with the first bad lines, tokens, forwards, tokens per forward, exact match,
seconds. An actor pool of engines (one model replica each; a GPU each with --gpus-per-replica 1) decodes
--batch-size records at a time, --batches-in-flight batches of them together: continuous batching inside a replica,
the next batch's records taking the slots that the last one's short answers free.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import time

import pyarrow as pa

import dllm
from dllm.engine import json_mode
from dllm.engine.async_loop import EngineLoop
from dllm.quantization import QUANTIZATIONS

from .pack import (PipelineError, check_output, conversation_prompt, error_of, expand_inputs, parse_file, record_texts,
                   write_stats)
from .runtime import ensure_ray, progress_bars_wanted

ERROR_KINDS = ("malformed_json", "missing_field", "wrong_type", "invalid_value", "too_long")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# Fields of a record that override the job's decoding for it (as Ray Data LLM's per-row sampling parameters, in
# vLLM's names): record field -> (GenerationConfig field, whether a JSON value fits, what fits)
RECORD_OVERRIDES = {
    "max_tokens": ("max_new_tokens", _is_int, "int"),
    "temperature": ("temperature", _is_number, "int or float"),
    "top_p": ("top_p", _is_number, "int or float"),
    "top_k": ("top_k", _is_int, "int"),
    "min_p": ("min_p", _is_number, "int or float"),
    "seed": ("seed", _is_int, "int"),
    "stop": ("stop", lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v)),
             "a string or a list of strings"),
    "stop_token_ids": ("stop_token_ids", lambda v: isinstance(v, list) and all(map(_is_int, v)), "a list of ints"),
    "min_tokens": ("min_tokens", _is_int, "int"),
    "ignore_eos": ("ignore_eos", lambda v: isinstance(v, bool), "true or false"),
    "presence_penalty": ("presence_penalty", _is_number, "int or float"),
    "frequency_penalty": ("frequency_penalty", _is_number, "int or float"),
    "repetition_penalty": ("repetition_penalty", _is_number, "int or float"),
}
OUTPUT_FORMATS = ("parquet", "jsonl")
SCHEMA = pa.schema([
    ("source", pa.string()), ("line", pa.int64()), ("record", pa.string()), ("prompt", pa.string()),
    ("reference", pa.string()), ("generated_text", pa.string()), ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()), ("forwards", pa.int64()),
    ("exact_match", pa.bool_()), ("error_kind", pa.string()), ("error", pa.string())])


def record_prompt(rec, chat_prompt, chat: bool) -> tuple[str, str | None]:
    """(prompt text, reference answer or None) of one input record; raises ValueError(kind, message)."""
    if isinstance(rec, dict) and "prompt" in rec:
        if not isinstance(rec["prompt"], str):
            raise ValueError("wrong_type", "field 'prompt' must be a string")
        reference = rec.get("output")
        if reference is not None and not isinstance(reference, str):
            raise ValueError("wrong_type", "field 'output' must be a string")
        return rec["prompt"], reference
    if isinstance(rec, dict) and not {"instruction", "messages", "conversations"} & set(rec):
        raise ValueError("missing_field", "a record needs 'prompt', 'instruction', 'messages' or 'conversations'")
    return record_texts(rec, chat_prompt, chat, answered=False)[0]


def record_config(rec: dict, config: dllm.GenerationConfig) -> dllm.GenerationConfig:
    """The job's decoding with the record's own RECORD_OVERRIDES and response_format; raises ValueError(kind,
    message)."""
    changes = {}
    for key, (field, fits, what) in RECORD_OVERRIDES.items():
        if key in rec and rec[key] is not None:
            if not fits(rec[key]):
                raise ValueError("wrong_type", f"field '{key}' must be {what}")
            changes[field] = [rec[key]] if key == "stop" and isinstance(rec[key], str) else rec[key]
    if rec.get("response_format") is not None:
        try:
            changes["response_format"], changes["json_schema"] = json_mode.openai_response_format(rec["response_format"])
        except ValueError as e:
            raise ValueError("wrong_type", f"field 'response_format' {e}") from e
    try:
        return config.replace(**changes) if changes else config
    except ValueError as e:
        raise ValueError("invalid_value", str(e)) from e


class Generate:
    """One engine replica: answers the records of up to `batches_in_flight` batches together (the next batch's
    requests take the slots that the last one's short answers free); a bad record is a row with its error."""

    def __init__(self, model: str, chat_template: bool, config: dict, max_batch_size: int,
                 max_model_len: int | None, quantization: str | None, batches_in_flight: int) -> None:
        device, dtype = dllm.inference_placement()
        tok = dllm.load_tokenizer(model)
        net = dllm.load_model(model, device=device, dtype=dtype)
        self.engine = dllm.Engine(net, tok, max_batch_size=max_batch_size, max_model_len=max_model_len,
                                  quantization=quantization)
        self.loop = EngineLoop(self.engine)
        # Ray Data runs several batches of an actor at once on one event loop (more within a task, more with
        # concurrent tasks): this bounds them, so that a replica holds no more records than it was asked to.
        self.batch_slots = asyncio.Semaphore(batches_in_flight)
        self.config = dllm.GenerationConfig(**config)
        self.chat = chat_template
        self.chat_prompt = functools.partial(conversation_prompt, tok, chat_template)

    def _check_json(self, config: dllm.GenerationConfig) -> None:
        """A record asking for JSON on a vocabulary that cannot write it is that record's invalid_value (the job's own
        --json is checked before any work)."""
        if config.response_format is not None:
            try:
                self.engine.json_vocabulary()
            except ValueError as e:
                raise ValueError("invalid_value", f"field 'response_format': {e}") from e

    async def __call__(self, batch: dict) -> pa.Table:
        async with self.batch_slots:
            rows, answers = [], []
            for record, kind, error, source, line in zip(batch["record"], batch["error_kind"], batch["error"],
                                                         batch["source"], batch["position"]):
                row = {"source": str(source), "line": int(line), "record": str(record), "error_kind": str(kind),
                       "error": str(error)}
                rows.append(row)
                if kind:
                    continue
                try:
                    rec = json.loads(record)
                    row["prompt"], row["reference"] = record_prompt(rec, self.chat_prompt, self.chat)
                    config = record_config(rec, self.config)
                    self._check_json(config)
                    answers.append(self._answer(row, self.engine.encode(row["prompt"]), config))
                except ValueError as ex:  # the record's (kind, message)
                    row["error_kind"], row["error"] = error_of(ex)
            await asyncio.gather(*answers)
        return pa.Table.from_pylist(rows, schema=SCHEMA)

    async def _answer(self, row: dict, prompt_ids: list[int], config: dllm.GenerationConfig) -> None:
        """Decode one record's prompt into its row (or the engine's refusal of its length)."""
        try:
            async for out in self.loop.generate(prompt_ids, config):
                pass
        except ValueError as ex:  # add_request's: the prompt cannot fit
            row["error_kind"], row["error"] = "too_long", str(ex)
            return
        g = out.generation
        row.update(generated_text=g.text, finish_reason=g.finish_reason, prompt_tokens=g.prompt_tokens,
                   completion_tokens=len(g.token_ids), forwards=g.num_forwards,
                   exact_match=None if row["reference"] is None else g.text == row["reference"])


def generation_config(args) -> dict:
    """The GenerationConfig every record is decoded with."""
    config = {"block_size": args.block_size, "threshold": args.threshold, "decoder": args.decoder,
              "max_new_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed,
              "early_stop": True, "response_format": "json_object" if args.json else None}
    if args.json_schema:
        try:
            with open(args.json_schema) as f:
                config.update(response_format="json_schema", json_schema=json.load(f))
        except (OSError, ValueError) as e:
            raise PipelineError(f"--json-schema: cannot read a JSON Schema from {args.json_schema}: {e}") from e
    dllm.GenerationConfig(**config)  # a bad value fails here, before any replica starts
    return config


def run_generate(args) -> dict:
    """Run the job; returns the stats dict that is also written as `stats.json`."""
    t0 = time.time()
    for flag in ("replicas", "batch_size", "batches_in_flight", "max_batch_size"):
        if getattr(args, flag) < 1:
            raise PipelineError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    paths = expand_inputs(args.input)
    config = generation_config(args)
    if not os.path.isdir(args.model):
        raise PipelineError(f"checkpoint directory {args.model} does not exist")
    try:  # here, not in every replica: a broken checkpoint is one clear error
        tokenizer = dllm.load_tokenizer(args.model)
        model_config = dllm.LLaDAConfig.from_file(os.path.join(args.model, "config.json"))
    except Exception as e:
        raise PipelineError(f"cannot read the checkpoint in {args.model}: {e}") from e
    if config["response_format"]:
        try:
            json_mode.json_vocabulary(tokenizer, model_config.embedding_size)
        except ValueError as e:
            raise PipelineError(f"--json / --json-schema: {e}") from e
    check_output(args.output)
    ray = ensure_ray(args.address)
    from ray.data import ActorPoolStrategy, DataContext, SaveMode
    from ray.data.datasource import FilenameProvider

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress_bars_wanted()
    ctx.enable_operator_progress_bars = progress_bars_wanted()
    # A file is read as one row, its records as one block: split them, or one replica would answer a whole file.
    records = ray.data.read_binary_files(paths, include_paths=True).flat_map(parse_file).repartition(
        4 * args.replicas * len(paths))
    answered = records.map_batches(
        Generate, fn_constructor_kwargs={"model": args.model, "chat_template": args.chat_template, "config": config,
                                         "max_batch_size": args.max_batch_size, "max_model_len": args.max_model_len,
                                         "quantization": args.quantization,
                                         "batches_in_flight": args.batches_in_flight},
        batch_size=args.batch_size,
        compute=ActorPoolStrategy(size=args.replicas, max_concurrent_calls_per_actor=args.batches_in_flight),
        num_gpus=args.gpus_per_replica or None, batch_format="numpy").materialize()
    if answered.count() == 0:
        raise PipelineError(f"the input {paths} holds no records")
    if args.format == "jsonl":  # named .jsonl: a reader globbing the rows' files never takes stats.json for one
        answered.write_json(args.output, mode=SaveMode.OVERWRITE, filename_provider=FilenameProvider(file_format="jsonl"))
    else:
        answered.write_parquet(args.output, mode=SaveMode.OVERWRITE)
    stats = summarize(answered.select_columns([c for c in SCHEMA.names if c not in ("record", "prompt")]).take_all(),
                      args.examples_shown)
    stats.update(inputs=paths, output=args.output, format=args.format, model=args.model, generation=config,
                 chat_template=args.chat_template, seconds=round(time.time() - t0, 2))
    stats["completion_tokens_per_s"] = stats["completion_tokens"] / max(stats["seconds"], 1e-9)
    write_stats(args.output, stats)
    return stats


def summarize(rows: list[dict], examples_shown: int) -> dict:
    """The job's counts from its output rows (the driver sees only these small columns)."""
    good = [r for r in rows if not r["error_kind"]]
    errors = {k: sum(r["error_kind"] == k for r in rows) for k in ERROR_KINDS}
    bad = sorted((r["source"], r["line"], r["error"]) for r in rows if r["error_kind"])
    scored = [r["exact_match"] for r in good if r["exact_match"] is not None]
    tokens, forwards = sum(r["completion_tokens"] for r in good), sum(r["forwards"] for r in good)
    return {"records": len(rows), "answered": len(good), "errors": errors,
            "error_examples": [f"{src}:{line}: {err}" for src, line, err in bad[:examples_shown]],
            "finish_reasons": {reason: sum(r["finish_reason"] == reason for r in good)
                               for reason in sorted({r["finish_reason"] for r in good})},
            "prompt_tokens": sum(r["prompt_tokens"] for r in good), "completion_tokens": tokens,
            "forwards": forwards, "tokens_per_forward": tokens / max(1, forwards),
            "with_reference": len(scored), "exact_match": sum(scored) / len(scored) if scored else None}


def summary(stats: dict) -> str:
    lines = [f"answered {stats['answered']} of {stats['records']} records: {stats['completion_tokens']} tokens in "
             f"{stats['forwards']} forwards (TPF {stats['tokens_per_forward']:.2f}), {stats['seconds']}s "
             f"({stats['completion_tokens_per_s']:.1f} tok/s) -> {stats['output']}"]
    if stats["exact_match"] is not None:
        lines.append(f"exact match {stats['exact_match']:.1%} of the {stats['with_reference']} records with a "
                     "reference answer")
    errors = {k: v for k, v in stats["errors"].items() if v}
    if errors:
        lines.append(f"not answered: {errors}")
        lines += [f"  {e}" for e in stats["error_examples"]]
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m pipelines.generate", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (model + tokenizer)")
    p.add_argument("--input", "-i", nargs="+", required=True, help="jsonl / parquet files, directories or globs")
    p.add_argument("--output", "-o", required=True, help="output directory (overwritten; rows + stats.json)")
    p.add_argument("--format", choices=OUTPUT_FORMATS, default="parquet")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap chat and Alpaca prompts in the tokenizer's chat template (as pack --chat-template)")
    p.add_argument("--decoder", default="threshold", choices=list(dllm.engine.DECODERS))
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--max-tokens", type=int, default=256, help="answer length cap")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, help="with a temperature: every record's samples drawn from this seed")
    p.add_argument("--json", action="store_true", help="JSON mode: every answer is one JSON object")
    p.add_argument("--json-schema", metavar="FILE", help="JSON mode held to the JSON Schema in FILE")
    p.add_argument("--quantization", choices=QUANTIZATIONS, help="fp8: FP8 block projections")
    p.add_argument("--replicas", type=int, default=1, help="engine actors")
    p.add_argument("--gpus-per-replica", type=float, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="records per engine call")
    p.add_argument("--batches-in-flight", type=int, default=2,
                   help="batches a replica decodes at once (1: each batch's last answer before the next batch)")
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together per replica")
    p.add_argument("--max-model-len", type=int, help="cache positions per request (default: the model's)")
    p.add_argument("--examples-shown", type=int, default=5, help="bad lines listed in stats.json")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        stats = run_generate(args)
    except (ValueError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
