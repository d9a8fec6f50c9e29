"""tool_choice "auto" end to end: a dLLM-Var model trained on function-calling chats decides between a call and text.

    python -m benchmarks.tool_calls_bench --minutes 12 --json benchmarks/results/<dir>/tool_calls.json

1. dllm.synthetic.tool_chats -> train / held-out chats (no held-out question is a training one): "weather in
   <city>?" with the weather tool offered is a call of it with that city, without it a refusal in text; "reverse
   <word>" is answered in text whether the tool is offered or not.
2. A char tokenizer with our chat template (the tools turn; earlier calls as hermes blocks); the Ray Data packing
   job with --chat-template --tool-call-format hermes (the answers' calls written as the server parses them).
3. Ray Train + DeepSpeed SFT: the quickstart's model and objective (document mask, tail masking, EOS padding,
   answer cuts).
4. Ray Serve with tool_call_parser hermes; each held-out chat through the openai client with its tools: no
   tool_choice (OpenAI's "auto": the model decides), and for the call kind also tool_choice "required" (the call
   forced, its arguments held to the parameters by JSON mode).

Per kind: decided (a call where one is due, text where not), exact (the call's name and arguments, or the text).
And the copying apart from the format: the share of call chats whose answer (decoded in process) holds the
expected arguments as the call writes them, whatever the text around them. And the length leak: the share of
held-out chats whose first block the model predicts differently (one forward, greedy) after a run of B masks than
after 4B; a model that reads the answer's length off its run of masks garbles answers longer than a block
(TrainConfig cut_answer_prob shows it cut answers in training).

    python -m benchmarks.tool_calls_bench --checkpoint DIR ...   # evaluate a trained model again, no training
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import socket
import time
from pathlib import Path

from benchmarks.report import write_json
import dllm
from dllm.quickstart import QUICK_TRAINING
from dllm.synthetic import TOOL_CHAT_KINDS, tool_chats

# A chat with the weather tool is ~250 tokens (prompt ~170, call ~75, EOS padding): each packed whole in a row
# (no_split), since a sample straddling rows loses its prompt under the document mask (its answer, in the next row,
# cannot see it: measured, 0 % of calls right after 12 min with 256-token concat rows).
SEQ_LEN = 320
SHUFFLE_ROWS = 2048  # no_split writes its rows grouped by length (one call chat a row, short chats together)


def write_chats(out: Path, n_train: int, n_heldout: int, max_word_len: int | None) -> tuple[Path, Path]:
    """train.jsonl and heldout.jsonl; held-out questions never appear in training."""
    out.mkdir(parents=True, exist_ok=True)
    held = tool_chats(n_heldout, seed=1, max_word_len=max_word_len)
    seen = {json.dumps(c["messages"][0]) for c in held}
    train = [c for c in tool_chats(n_train + 2 * n_heldout, seed=2, max_word_len=max_word_len)
             if json.dumps(c["messages"][0]) not in seen][:n_train]
    for name, chats in (("train.jsonl", train), ("heldout.jsonl", held)):
        (out / name).write_text("".join(json.dumps(c) + "\n" for c in chats))
    return out / "train.jsonl", out / "heldout.jsonl"


def train_model(args, work: Path, train_path: Path, held_path: Path) -> tuple[Path, dict]:
    """Pack and train as the quickstart does, on chats; returns the checkpoint and the training's numbers."""
    from pipelines.pack import PackOptions, run_pack
    from train.config import TrainConfig
    from train.sft import final_model_dir, run_training

    texts = [json.dumps(c) for c in tool_chats(2000, seed=3)]  # every character the chats and the template write
    tok = dllm.train_tokenizer(texts + ["<tool_call>\n</tool_call>"], kind="char")
    tok.save_pretrained(str(work / "tokenizer"))
    pack = PackOptions(inputs=[str(train_path)], output=str(work / "packed"), tokenizer=str(work / "tokenizer"),
                       seq_len=SEQ_LEN, mode="no_split", chat_template=True, tool_call_format="hermes",
                       eos_pad=args.eos_pad, num_tokenizers=1)
    stats = run_pack(pack)
    held = run_pack(dataclasses.replace(pack, inputs=[str(held_path)], output=str(work / "packed-heldout")))
    if sum(stats["dropped"].values()) or sum(held["dropped"].values()):
        raise SystemExit(f"packing dropped chats: {stats['dropped']} / {held['dropped']}")
    cfg = TrainConfig(**{**QUICK_TRAINING, "cut_answer_prob": args.cut_answer}, run_name=f"tool-calls-{int(time.time())}",
                      data=pack.output, tokenizer=pack.tokenizer, storage_path=str(work / "runs"), seq_len=SEQ_LEN,
                      micro_batch_size=max(1, 16 // args.workers), num_workers=args.workers, use_gpu=False,
                      precision="fp32", max_steps=args.steps, time_limit_s=args.minutes * 60,
                      shuffle_buffer_rows=SHUFFLE_ROWS, eval_data=str(work / "packed-heldout"), eval_every=500)
    result = run_training(cfg)
    if result.error:
        raise SystemExit(f"training failed: {result.error}")
    model_dir = final_model_dir(result)
    history = json.loads((model_dir / "trainer_state.json").read_text())["history"]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return model_dir, {"steps": history[-1]["step"], "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
                       "last_eval_loss": evals[-1] if evals else None, "minutes": args.minutes,
                       "train_chats": stats["records_read"], "samples_packed": stats["samples_packed"]}


def judge(chat: dict, message: dict) -> tuple[bool, bool]:
    """(decided, exact) of an answer (OpenAI's message as a dict): a call where one is due, text where not; the
    call's name and arguments, or the text."""
    expected = chat["messages"][-1]
    calls = message.get("tool_calls") or []
    if chat["kind"] == "call":
        want = expected["tool_calls"][0]["function"]
        got = [(c["function"]["name"], _json_or_none(c["function"]["arguments"])) for c in calls]
        return bool(calls), got == [(want["name"], json.loads(want["arguments"]))]
    return not calls, not calls and message.get("content") == expected["content"]


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def evaluate(model_dir: Path, held: list[dict], args) -> dict:
    """The held-out chats through the OpenAI-compatible API of a Serve app with the hermes tool-call parser."""
    import openai
    from ray import serve

    from serve.app import build_app

    port = args.port or _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"model": str(model_dir), "name": "tools", "max_model_len": 512, "max_batch_size": 16,
                             "num_cpus": 1, "tool_call_parser": "hermes",
                             "decoding": {"block_size": args.block_size, "max_tokens": 96}}), name="tools",
                  route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)

        def ask(chat: dict, **kw) -> dict:
            tools = {"tools": chat["tools"]} if chat["tools"] else {}
            r = client.chat.completions.create(model="tools", messages=chat["messages"][:-1], **tools, **kw)
            return {"message": r.choices[0].message.model_dump(), "finish_reason": r.choices[0].finish_reason,
                    "tokens": r.usage.completion_tokens}

        t = time.time()
        with cf.ThreadPoolExecutor(8) as pool:
            auto = list(pool.map(ask, held))
            wall = time.time() - t
            calls = [c for c in held if c["kind"] == "call"]
            required = list(pool.map(lambda c: ask(c, tool_choice="required"), calls))
    finally:
        serve.delete("tools")
        serve.shutdown()
    rows = {}
    for kind in TOOL_CHAT_KINDS:
        judged = [judge(c, a["message"]) for c, a in zip(held, auto) if c["kind"] == kind]
        rows[kind] = {"chats": len(judged), "decided": _share(d for d, _ in judged),
                      "exact": _share(e for _, e in judged)}
    rows["call"]["exact_required"] = _share(judge(c, a["message"])[1] for c, a in zip(calls, required))
    judged_all = [judge(c, a["message"]) for c, a in zip(held, auto)]
    return {"kinds": rows, "decided": _share(d for d, _ in judged_all), "exact": _share(e for _, e in judged_all),
            "finish_tool_calls": sum(a["finish_reason"] == "tool_calls" for a in auto),
            "tokens_per_s": sum(a["tokens"] for a in auto) / wall, "wall_s": wall,
            "examples": [{"kind": c["kind"], "question": c["messages"][0]["content"], "tools": bool(c["tools"]),
                          "answer": a["message"].get("content"),
                          "calls": [x["function"] for x in a["message"].get("tool_calls") or []]}
                         for c, a in list(zip(held, auto))[:6]]}


def _prompt(tok, chat: dict) -> str:
    """A held-out chat's prompt as the server renders it (the chat template, the tools turn where it has tools)."""
    return tok.apply_chat_template(chat["messages"][:-1], tools=chat["tools"] or None, add_generation_prompt=True,
                                   tokenize=False)


def length_leak(model, tok, held: list[dict], block: int) -> dict:
    """Share of chats whose greedy one-forward prediction of the first `block` answer positions (up to a stop token)
    changes when 4 * block masks follow the prompt instead of `block` (the engine's first forward sees `block`)."""
    import torch

    ids = dllm.special_ids(tok)
    mask, stops = ids["mask_token_id"], {ids["eos_token_id"], ids["eot_token_id"]}

    def answer(guess: list[int]) -> list[int]:  # up to its first stop token: what follows one is not the answer
        return next((guess[:k + 1] for k, t in enumerate(guess) if t in stops), guess)

    shifted = []
    with torch.no_grad():
        for chat in held:
            prompt = tok.encode(_prompt(tok, chat), add_special_tokens=False)
            short, long = (answer(model(torch.tensor([prompt + [mask] * n]))[0, len(prompt):len(prompt) + block]
                                  .argmax(-1).tolist()) for n in (block, 4 * block))
            shifted.append(short != long)
    by_kind = {kind: _share(s for s, c in zip(shifted, held) if c["kind"] == kind) for kind in TOOL_CHAT_KINDS}
    return {"block": block, "shifted": _share(shifted), "kinds": by_kind}


def arguments_copied(model, tok, held: list[dict], block: int) -> float:
    """Share of the call chats whose answer, decoded in process (greedy, threshold 0.9), holds each expected argument
    as the call writes it (`"city": "gahed"`), whatever the text around it: the copying, apart from the format."""
    calls = [c for c in held if c["kind"] == "call"]
    outs = dllm.Engine(model, tok, max_batch_size=16).generate(
        [_prompt(tok, c) for c in calls], dllm.GenerationConfig(block_size=block, max_new_tokens=128))
    wanted = [json.loads(c["messages"][-1]["tool_calls"][0]["function"]["arguments"]) for c in calls]
    return _share(all(f"{json.dumps(k)}: {json.dumps(v)}" in o.text for k, v in w.items()) for w, o in zip(wanted, outs))


def _share(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print_table(report: dict) -> None:
    if report["train"]:
        print(f"\ntrained {report['train']['steps']} steps ({report['train']['minutes']:g} min), loss "
              f"{report['train']['first_loss']:.3f} -> {report['train']['last_loss']:.3f}")
    print(f"{'kind':<8} {'chats':>5} {'decided':>8} {'exact':>6} {'exact (required)':>17}")
    for kind, row in report["eval"]["kinds"].items():
        forced = f"{row['exact_required']:.1%}" if "exact_required" in row else "-"
        print(f"{kind:<8} {row['chats']:>5} {row['decided']:>8.1%} {row['exact']:>6.1%} {forced:>17}")
    ev = report["eval"]
    print(f"{'all':<8} {sum(r['chats'] for r in ev['kinds'].values()):>5} {ev['decided']:>8.1%} {ev['exact']:>6.1%}")
    print(f"finish_reason tool_calls: {ev['finish_tool_calls']}; {ev['tokens_per_s']:.1f} tok/s at 8 concurrent")
    leak = report["length_leak"]
    print(f"first block predicted differently after {leak['block']} masks than after {4 * leak['block']}: "
          f"{leak['shifted']:.1%} of chats (" + ", ".join(f"{k} {v:.1%}" for k, v in leak["kinds"].items()) + ")")
    print(f"calls whose arguments are written right, whatever the text around them: {report['arguments_copied']:.1%}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tool_calls_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="tool-calls-bench", help="data, packed rows, checkpoints")
    p.add_argument("--minutes", type=float, default=12.0, help="training time budget")
    p.add_argument("--steps", type=int, default=100000, help="cap on optimizer steps")
    p.add_argument("--train-samples", type=int, default=20000)
    p.add_argument("--heldout", type=int, default=150, help="held-out chats (the kinds in about equal parts)")
    p.add_argument("--max-word-len", type=int, default=5, help="cap on the cities' and words' letters (2 to 8)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--eos-pad", type=int, default=8)
    p.add_argument("--cut-answer", type=float, default=0.2,
                   help="fraction of rows whose answers are seen only up to a random cut (TrainConfig cut_answer_prob; "
                        "0: off, the model then reads answers' lengths off the masks and garbles those past a block; "
                        "default 0.2: at 30 CPU minutes 44.7 %% exact against 36.0 %% with 0.5 and 5.3 %% with 0, README)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--port", type=int, help="Serve's HTTP port (default: a free one)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--checkpoint", help="evaluate this trained model (its held-out chats: the same settings) "
                                        "instead of training one")
    args = p.parse_args(argv)
    work = Path(args.workdir).absolute()
    train_path, held_path = write_chats(work / "data", args.train_samples, args.heldout, args.max_word_len)
    if args.checkpoint:
        model_dir, train = Path(args.checkpoint), None
    else:
        model_dir, train = train_model(args, work, train_path, held_path)
    held = [json.loads(line) for line in held_path.read_text().splitlines()]
    tok, model = dllm.load_tokenizer(model_dir), dllm.load_model(model_dir).eval()  # for the in-process measures
    report = {"train": train, "eval": evaluate(model_dir, held, args),
              "length_leak": length_leak(model, tok, held, args.block_size),
              "arguments_copied": arguments_copied(model, tok, held, args.block_size), "checkpoint": str(model_dir),
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "port")}}
    print_table(report)
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
