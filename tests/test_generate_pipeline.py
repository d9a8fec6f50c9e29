"""Offline batch generation as a Ray Data job (pipelines.generate / `dllm batch`): engine actors answer every
record of a dataset, bad records are rows with their reason, and the answers are the engine's."""

import asyncio
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dllm
from dllm.cli import main as cli_main
from pipelines.generate import Generate, main, record_prompt
from pipelines.pack import conversation_prompt

pytestmark = pytest.mark.slow
CFG = dllm.GenerationConfig(block_size=8, threshold=0.9, max_new_tokens=24, early_stop=True)
FLAGS = ["--block-size", "8", "--max-tokens", "24", "--max-model-len", "64"]


def test_a_record_is_answered_from_its_prompt_alpaca_fields_or_conversation(char_tokenizer):
    def prompt(rec, chat=False):
        return record_prompt(rec, lambda context, tools: conversation_prompt(char_tokenizer, chat, context, tools), chat)

    assert prompt({"prompt": "sort: dcba =>", "output": "abcd"}) == ("sort: dcba =>", "abcd")
    assert prompt({"instruction": "add ", "input": "12+34 =>"}) == ("add 12+34 =>", None)  # no output: no reference
    user = [{"role": "user", "content": "sort: cba =>"}]
    assert prompt({"messages": user + [{"role": "assistant", "content": "abc"}]}) == ("sort: cba =>", "abc")
    templated = char_tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert prompt({"messages": user}, chat=True) == (templated, None)  # as pack --chat-template trains it
    assert prompt({"conversations": [{"from": "human", "value": "sort: cba =>"}]}, chat=True) == (templated, None)
    for rec, kind in [({"text": "hi"}, "missing_field"), ({"prompt": 5}, "wrong_type"), ([1, 2], "wrong_type"),
                      ({"instruction": "x", "output": 3}, "wrong_type"), ({"messages": "hi"}, "wrong_type")]:
        with pytest.raises(ValueError) as e:
            prompt(rec)
        assert e.value.args[0] == kind, rec


def _inner_stop(answer: str) -> str:
    """Two characters of the answer that first occur after its start: a stop string that leaves some text."""
    return next(answer[i:i + 2] for i in range(1, len(answer) - 1) if answer.find(answer[i:i + 2]) == i)


@pytest.fixture(scope="module")
def answered(tmp_path_factory, talkative_model, char_tokenizer, ray_local):
    root = tmp_path_factory.mktemp("batch")
    ckpt = dllm.save_pretrained(talkative_model, char_tokenizer, root / "ckpt")
    engine = dllm.Engine(talkative_model, char_tokenizer, max_model_len=64)
    prompts = ["sort: dcba =>", "abc", "reverse: abc =>", "add 12+34 =>", "cab", "dedupe: aabb =>"]
    answers = [g.text for g in engine.generate(prompts, CFG)]
    lines = [
        {"prompt": prompts[0]},
        {"instruction": prompts[1], "input": "", "output": answers[1]},  # a reference the model matches
        {"instruction": prompts[2], "output": answers[2] + "x"},  # and one it does not
        {"messages": [{"role": "user", "content": prompts[3]}]},
        {"conversations": [{"from": "human", "value": prompts[4]}, {"from": "gpt", "value": answers[4]}]},
        "not json {",
        {"text": "no prompt field"},
        {"prompt": 5},
        {"prompt": "a" * 60},  # 60 tokens + a block of 8 > max_model_len 64
        {"prompt": prompts[0], "max_tokens": 8},  # the record's own decoding
        {"prompt": prompts[0], "temperature": "hot"},
        {"prompt": prompts[0], "max_tokens": 0},
        {"prompt": prompts[0], "response_format": {"type": "json_object"}},  # its characters hold no '{'
        {"prompt": prompts[0], "response_format": "json"},
        {"prompt": prompts[0], "stop": _inner_stop(answers[0])},  # vLLM's sampling fields too
        {"prompt": prompts[1], "ignore_eos": True},
        {"prompt": prompts[0], "stop": [1]},
        {"prompt": prompts[0], "presence_penalty": 5},
    ]
    with open(root / "records.jsonl", "w") as f:
        for i, line in enumerate(lines):
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
            if i == 2:
                f.write("\n")  # blank lines are not records
    pq.write_table(pa.table({"prompt": [prompts[5]], "id": [17]}), root / "more.parquet")
    rc = main(["--model", str(ckpt), "--input", str(root / "records.jsonl"), str(root / "more.parquet"),
               "--output", str(root / "out"), "--format", "jsonl", "--replicas", "2", "--batch-size", "3", *FLAGS])
    assert rc == 0
    rows = [json.loads(line) for path in sorted((root / "out").glob("*.jsonl")) for line in path.open()]
    return root, prompts, answers, rows, json.loads((root / "out" / "stats.json").read_text())


def test_every_record_is_a_row_and_the_answers_are_the_engines(answered):
    _, prompts, answers, rows, _ = answered
    by_line = {(r["source"].rsplit("/", 1)[-1], r["line"]): r for r in rows}
    assert len(rows) == len(by_line) == 19  # 18 jsonl records (the blank line is none) + 1 parquet row
    good = [by_line[("records.jsonl", n)] for n in (1, 2, 3, 5, 6)] + [by_line[("more.parquet", 1)]]
    assert [r["prompt"] for r in good] == prompts  # Alpaca and chat records read as pack reads them
    assert [r["generated_text"] for r in good] == answers
    assert all(r["error_kind"] == "" and r["finish_reason"] in ("stop", "length") for r in good)
    assert [r["exact_match"] for r in good] == [None, True, False, None, True, None]
    assert json.loads(by_line[("more.parquet", 1)]["record"]) == {"prompt": prompts[5], "id": 17}  # nothing lost
    assert all(r["completion_tokens"] >= 0 and r["forwards"] >= 1 for r in good)
    own = by_line[("records.jsonl", 11)]  # max_tokens 8 in the record (the job's is 24): the same first block
    assert own["completion_tokens"] <= 8 and answers[0].startswith(own["generated_text"])
    stopped, endless = by_line[("records.jsonl", 16)], by_line[("records.jsonl", 17)]
    assert stopped["finish_reason"] == "stop" and stopped["generated_text"] == answers[0][:answers[0].find(
        _inner_stop(answers[0]))] != ""
    assert by_line[("records.jsonl", 2)]["finish_reason"] == "stop"  # the same prompt, EOS ending it
    assert endless["finish_reason"] == "length" and endless["completion_tokens"] == 24  # the job's max_tokens


def test_bad_records_are_rows_with_their_reason_and_counted(answered):
    _, _, _, rows, stats = answered
    bad = {r["line"]: (r["error_kind"], r["error"]) for r in rows if r["error_kind"]}
    assert {line: kind for line, (kind, _) in bad.items()} == {
        7: "malformed_json", 8: "missing_field", 9: "wrong_type", 10: "too_long", 12: "wrong_type", 13: "invalid_value",
        14: "invalid_value", 15: "wrong_type", 18: "wrong_type", 19: "invalid_value"}
    assert bad[12][1] == "field 'temperature' must be int or float" and "max_new_tokens=0" in bad[13][1]
    assert bad[14][1].startswith("field 'response_format': ") and "starts a JSON object" in bad[14][1]
    assert bad[15][1].startswith("field 'response_format' must be")
    assert bad[18][1] == "field 'stop' must be a string or a list of strings" and "presence_penalty=5" in bad[19][1]
    assert "max_model_len=64" in bad[10][1]  # the engine's reason
    assert all(r["generated_text"] is None for r in rows if r["error_kind"])
    assert [r["record"] for r in rows if r["line"] == 7] == ["not json {"]  # kept as it was read
    assert stats["records"] == 19 and stats["answered"] == 9
    assert stats["errors"] == {"malformed_json": 1, "missing_field": 1, "wrong_type": 4, "invalid_value": 3,
                               "too_long": 1}
    assert len(stats["error_examples"]) == 5 and stats["error_examples"][0].endswith("malformed JSON: Expecting value "
                                                                                      "at column 1")  # the first 5
    good = [r for r in rows if not r["error_kind"]]
    assert stats["completion_tokens"] == sum(r["completion_tokens"] for r in good)
    assert stats["forwards"] == sum(r["forwards"] for r in good)
    assert stats["with_reference"] == 3 and stats["exact_match"] == pytest.approx(2 / 3)


def test_bad_options_fail_before_any_work(tmp_path, capsys, tiny_checkpoint):
    records = tmp_path / "r.jsonl"
    records.write_text('{"prompt": "abc"}\n')
    assert main(["--model", str(tmp_path / "missing"), "--input", str(records), "--output", str(tmp_path / "o")]) == 2
    assert "checkpoint directory" in capsys.readouterr().err
    assert cli_main(["batch", "--model", str(tmp_path / "missing"), "--input", str(records),  # `dllm batch`: the same
                     "--output", str(tmp_path / "o")]) == 2
    assert "checkpoint directory" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--input", str(records), "--output", str(tmp_path / "o")]) == 2
    assert f"cannot read the checkpoint in {tmp_path}" in capsys.readouterr().err  # a directory without one
    assert main(["--model", str(tiny_checkpoint), "--input", str(records), "--output", str(tmp_path / "o"),
                 "--threshold", "2"]) == 2
    assert "threshold" in capsys.readouterr().err
    assert main(["--model", str(tiny_checkpoint), "--input", str(records), "--output", str(tmp_path / "o"),
                 "--json"]) == 2  # its characters hold no '{'
    assert "--json / --json-schema: " in (err := capsys.readouterr().err) and "starts a JSON object" in err
    schema = tmp_path / "schema.json"
    for text, message in [("{not json", "cannot read a JSON Schema"),
                          ('{"type": "object", "properties": {"a": {"minLength": 1}}}', "minLength at #/properties/a")]:
        schema.write_text(text)
        assert main(["--model", str(tiny_checkpoint), "--input", str(records), "--output", str(tmp_path / "o"),
                     "--json-schema", str(schema)]) == 2
        assert message in capsys.readouterr().err
    assert main(["--model", str(tiny_checkpoint), "--input", str(records), "--output", str(tmp_path / "o"),
                 "--batches-in-flight", "0"]) == 2
    assert "--batches-in-flight must be at least 1, got 0" in capsys.readouterr().err
    assert main(["--model", str(tiny_checkpoint), "--input", str(tmp_path / "none*.jsonl"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "no input files match" in capsys.readouterr().err


def test_rows_are_parquet_by_default(answered):
    root = answered[0]
    assert main(["--model", str(root / "ckpt"), "--input", str(root / "more.parquet"), "--output", str(root / "pq"),
                 *FLAGS]) == 0
    table = pa.concat_tables(pq.read_table(f) for f in sorted((root / "pq").glob("*.parquet")))  # + stats.json
    assert table.num_rows == 1 and table.column("generated_text")[0].as_py() == answered[2][5]


def batch_of(prompts: list[str], first_line: int) -> dict:
    """A batch as the job hands it to a replica (its records read, none bad)."""
    n = len(prompts)
    return {"record": [json.dumps({"prompt": p}) for p in prompts], "error_kind": [""] * n, "error": [""] * n,
            "source": ["records.jsonl"] * n, "position": list(range(first_line, first_line + n))}


@pytest.mark.parametrize("in_flight, most_running", [(1, 2), (2, 4)])
def test_a_replica_decodes_the_next_batchs_records_beside_the_last_ones(tmp_path, talkative_model, char_tokenizer,
                                                                         in_flight, most_running):
    ckpt = dllm.save_pretrained(talkative_model, char_tokenizer, tmp_path / "ckpt")
    config = {"block_size": 8, "threshold": 0.9, "max_new_tokens": 24, "early_stop": True}
    replica = Generate(str(ckpt), chat_template=False, config=config, max_batch_size=4, max_model_len=64,
                       quantization=None, batches_in_flight=in_flight)
    running = []  # requests in the engine's batch after each step
    replica.loop.on_step = lambda stats: running.append(stats["running"])
    prompts = ["sort: dcba =>", "abc", "reverse: abc =>", "cab"]

    async def two_batches():  # as Ray Data hands an async replica its batches: at once
        return await asyncio.gather(replica(batch_of(prompts[:2], 1)), replica(batch_of(prompts[2:], 3)))

    tables = asyncio.run(two_batches())
    assert max(running) == most_running  # 1: a batch's last answer before the next batch; 2: both batches together
    engine = dllm.Engine(talkative_model, char_tokenizer, max_model_len=64)
    answers = [g.text for g in engine.generate(prompts, dllm.GenerationConfig(**config))]
    assert [t for table in tables for t in table.column("generated_text").to_pylist()] == answers
    assert [line for table in tables for line in table.column("line").to_pylist()] == [1, 2, 3, 4]


def test_a_records_response_format_answers_it_in_json_as_the_engine_does(tmp_path, json_tokenizer):
    from conftest import make_config
    from dllm.engine.json_mode import JsonPrefix

    model = dllm.build_model(make_config(json_tokenizer), seed=0)
    ckpt = dllm.save_pretrained(model, json_tokenizer, tmp_path / "ckpt")
    config = {"block_size": 8, "threshold": 0.9, "max_new_tokens": 80, "early_stop": True}
    replica = Generate(str(ckpt), chat_template=False, config=config, max_batch_size=4, max_model_len=128,
                       quantization=None, batches_in_flight=1)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    formats = [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "flag", "schema": schema}},
               {"type": "text"}]
    batch = {"record": [json.dumps({"prompt": "ok?", "response_format": f}) for f in formats], "error_kind": [""] * 3,
             "error": [""] * 3, "source": ["r.jsonl"] * 3, "position": [1, 2, 3]}
    rows = asyncio.run(replica(batch)).to_pylist()
    engine = dllm.Engine(model, json_tokenizer, max_model_len=128)
    base = dllm.GenerationConfig(**config)
    direct = [engine.generate(["ok?"], cfg)[0].text for cfg in (
        base.replace(response_format="json_object"), base.replace(response_format="json_schema", json_schema=schema), base)]
    assert [r["generated_text"] for r in rows] == direct and all(not r["error_kind"] for r in rows)
    assert JsonPrefix().feed(direct[0].encode()) is not None and set(json.loads(direct[1])) == {"ok"}
