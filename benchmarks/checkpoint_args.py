"""What the benchmarks on a trained checkpoint share: its command-line arguments, and loading the
model, its tokenizer and the held-out rows."""

from __future__ import annotations

import argparse
import json

import torch

import dllm


def add_checkpoint_arguments(p: argparse.ArgumentParser, prompts_help: str) -> None:
    """--model, --prompts-jsonl, --device, --dtype and --num-prompts."""
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--prompts-jsonl", required=True, help=prompts_help)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--num-prompts", type=int, default=100)


def load_checkpoint(args) -> tuple[dllm.LLaDAModelLM, object, list[dict]]:
    """(model, tokenizer, every held-out row) from the arguments above."""
    model = dllm.load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    rows = [json.loads(line) for line in open(args.prompts_jsonl) if line.strip()]
    return model, dllm.load_tokenizer(args.model), rows
