"""The Ray Data packing job, end to end on a local Ray."""

import collections
import glob
import json

import pyarrow.parquet as pq
import pytest

import dllm
from pipelines.pack import PackOptions, PipelineError, main, run_pack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, char_tokenizer):
    path = tmp_path_factory.mktemp("tok")
    char_tokenizer.save_pretrained(str(path))
    return path


def _alpaca(i):
    return {"instruction": f"reverse: {'abcdef'[: 1 + i % 6]} =>", "input": " " * (i % 2), "output": "fedcba"[: 1 + i % 6]}


def _read_rows(out):
    files = sorted(glob.glob(str(out / "*.parquet")))
    return pq.ParquetDataset(files).read().to_pylist()


def _samples_in_rows(rows):
    """(prompt, response) of every sample piece found in the rows, via segment ids + prompt mask."""
    found = []
    for r in rows:
        for s in sorted(set(r["segment_ids"]) - {0}):
            idx = [i for i, v in enumerate(r["segment_ids"]) if v == s]
            found.append((tuple(r["input_ids"][i] for i in idx if r["prompt_mask"][i]),
                          tuple(r["input_ids"][i] for i in idx if not r["prompt_mask"][i])))
    return found


def test_jsonl_with_bad_lines_packs_every_good_sample_once_and_reports_the_rest(ray_local, tmp_path, tokenizer_dir,
                                                                            char_tokenizer):
    src = tmp_path / "data.jsonl"
    good = [_alpaca(i) for i in range(40)]
    lines = [json.dumps(g) for g in good[:20]]
    lines += ["{broken", json.dumps({"instruction": "no output"}), json.dumps({"instruction": "a", "output": "   "}),
              json.dumps({"instruction": "x" * 200, "output": "y"}), json.dumps({"instruction": 3, "output": "z"})]
    lines += [json.dumps(g) for g in good[20:]]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "packed"
    opts = PackOptions(inputs=[str(src)], output=str(out), tokenizer=str(tokenizer_dir), seq_len=48, mode="no_split",
                       num_tokenizers=1, pack_batch_size=16)
    stats = run_pack(opts)

    enc = lambda t: tuple(char_tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    eos = char_tokenizer.eos_token_id
    expected = [(enc(g["instruction"] + g["input"]), enc(g["output"]) + (eos,)) for g in good]
    rows = _read_rows(out)
    assert sorted(_samples_in_rows(rows)) == sorted(expected)  # each good sample exactly once, masks right
    assert all(len(r["input_ids"]) == 48 for r in rows)
    assert stats["samples_read"] == 45 and stats["samples_packed"] == 40
    assert stats["dropped"] == {"malformed_json": 1, "missing_field": 1, "wrong_type": 1, "empty_response": 1,
                                "too_long": 1}
    assert stats["dropped_examples"][0].endswith(":21: malformed JSON: Expecting property name enclosed in double quotes at column 2")
    assert ":22: missing field 'output'" in stats["dropped_examples"][1]
    assert stats["tokens_in"] == stats["tokens_out"] == sum(len(p) + len(r) for p, r in expected)
    assert stats["rows_written"] == len(rows)
    assert json.loads((out / "stats.json").read_text())["rows_written"] == len(rows)

    # Re-running overwrites instead of appending.
    run_pack(opts)
    assert len(_read_rows(out)) == len(rows)


def test_concat_mode_streams_samples_with_only_the_last_row_padded(ray_local, tmp_path, tokenizer_dir, char_tokenizer):
    src = tmp_path / "data.jsonl"
    good = [_alpaca(i) for i in range(60)]
    src.write_text("\n".join(json.dumps(g) for g in good))
    stats = run_pack(PackOptions(inputs=[str(src)], output=str(tmp_path / "out"), tokenizer=str(tokenizer_dir),
                                 seq_len=40, mode="concat", num_tokenizers=1, pack_batch_size=8))
    rows = _read_rows(tmp_path / "out")
    padded = [r for r in rows if 0 in r["segment_ids"]]
    assert len(padded) <= 1
    enc = lambda t: char_tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = collections.Counter()
    prompt_tokens = 0
    for g in good:
        p = enc(g["instruction"] + g["input"])
        expected.update(p + enc(g["output"]) + [char_tokenizer.eos_token_id])
        prompt_tokens += len(p)
    got = collections.Counter(t for r in rows for t, s in zip(r["input_ids"], r["segment_ids"]) if s)
    assert got == expected
    assert sum(m for r in rows for m in r["prompt_mask"]) == prompt_tokens
    assert stats["packing_efficiency"] > (len(rows) - 1) / len(rows)


def test_eos_padding_follows_each_response_with_its_own_0_to_n_eos_and_never_drops_a_sample(ray_local, tmp_path,
                                                                                           tokenizer_dir, char_tokenizer):
    """--eos-pad N: each response gets dllm.eos_padded's count for its file name and line, the same on every
    run; a sample already at the length limit gets no padding instead of being dropped."""
    good = [_alpaca(i) for i in range(30)]
    full = {"instruction": "x" * 40, "output": "abcdefg"}  # 47 characters + EOS = 48: exactly the limit
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(g) for g in good + [full]))
    opts = PackOptions(inputs=[str(tmp_path / "data.jsonl")], output=str(tmp_path / "out"), tokenizer=str(tokenizer_dir),
                       seq_len=48, mode="no_split", num_tokenizers=1, eos_pad=8)
    stats = run_pack(opts)

    enc = lambda t: tuple(char_tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    eos = char_tokenizer.eos_token_id
    expected = []
    for line, g in enumerate(good, start=1):
        padded = dllm.eos_padded(list(enc(g["output"])) + [eos], eos, 8, key=f"data.jsonl:{line}")
        expected.append((enc(g["instruction"] + g["input"]), tuple(padded)))
    expected.append((enc(full["instruction"]), enc(full["output"]) + (eos,)))
    rows = _read_rows(tmp_path / "out")
    assert sorted(_samples_in_rows(rows)) == sorted(expected)
    extra = [len(r) - len(g["output"]) - 1 for (_, r), g in zip(expected, good)]
    assert len(set(extra)) > 4 and max(extra) <= 8  # drawn per sample, not one count for all
    assert stats["samples_packed"] == 31 and stats["eos_padding_tokens"] == sum(extra)
    assert stats["tokens_in"] == stats["tokens_out"]

    run_pack(opts)  # the same rows again
    assert sorted(_samples_in_rows(_read_rows(tmp_path / "out"))) == sorted(expected)
    with pytest.raises(PipelineError, match="--eos-pad"):
        PackOptions(inputs=[], output="o", tokenizer=str(tokenizer_dir), eos_pad=-1)


def test_chat_style_parquet_input_with_the_chat_template(ray_local, tmp_path, tokenizer_dir, char_tokenizer):
    import pyarrow as pa

    msgs = [[{"role": "user", "content": f"add {i}+1"}, {"role": "assistant", "content": str(i + 1)}] for i in range(12)]
    pq.write_table(pa.table({"messages": msgs}), str(tmp_path / "chat.parquet"))
    stats = run_pack(PackOptions(inputs=[str(tmp_path / "chat.parquet")], output=str(tmp_path / "out"),
                                 tokenizer=str(tokenizer_dir), seq_len=96, mode="no_split", chat_template=True,
                                 num_tokenizers=1))
    assert stats["samples_packed"] == 12
    found = sorted(_samples_in_rows(_read_rows(tmp_path / "out")))
    eot = char_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    prompt = char_tokenizer.apply_chat_template(msgs[0][:1], tokenize=False, add_generation_prompt=True)
    assert (tuple(char_tokenizer(prompt, add_special_tokens=False)["input_ids"]),
            tuple(char_tokenizer("1", add_special_tokens=False)["input_ids"]) + (eot,)) in found


@pytest.mark.parametrize("chat_template", [False, True])
def test_sharegpt_records_pack_exactly_like_their_chat_messages(ray_local, tmp_path, tokenizer_dir, chat_template):
    turns = [[{"from": "system", "value": "be brief"}, {"from": "human", "value": f"add {i}+1"},
              {"from": "gpt", "value": str(i + 1)}] for i in range(10)]
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    (tmp_path / "share.jsonl").write_text("".join(json.dumps({"conversations": c}) + "\n" for c in turns) + json.dumps(
        {"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}) + "\n")
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(
        {"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in c]}) + "\n" for c in turns))
    packed = {}
    for name in ("share", "chat"):
        packed[name] = run_pack(PackOptions(inputs=[str(tmp_path / f"{name}.jsonl")], output=str(tmp_path / name),
                                            tokenizer=str(tokenizer_dir), seq_len=96, mode="no_split",
                                            chat_template=chat_template, num_tokenizers=1))
    assert sorted(_samples_in_rows(_read_rows(tmp_path / "share"))) == sorted(_samples_in_rows(_read_rows(tmp_path / "chat")))
    assert packed["share"]["samples_packed"] == 10 and packed["share"]["dropped"]["wrong_type"] == 1
    assert "conversations[0].from is 'robot'" in packed["share"]["dropped_examples"][0]


@pytest.mark.parametrize("all_turns", [False, True])
def test_multi_turn_chats_give_the_last_turn_or_every_turn(ray_local, tmp_path, tokenizer_dir, char_tokenizer,
                                                            all_turns):
    chats = [[{"role": "user", "content": f"add {i}+1"}, {"role": "assistant", "content": str(i + 1)},
              {"role": "user", "content": "and +2"}, {"role": "assistant", "content": str(i + 3)}] for i in range(6)]
    chats.append(chats[0][:3] + [{"role": "assistant", "content": "9" * 200}])  # its second answer is too long
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    stats = run_pack(PackOptions(inputs=[str(tmp_path / "chat.jsonl")], output=str(tmp_path / "out"),
                                 tokenizer=str(tokenizer_dir), seq_len=128, mode="no_split", chat_template=True,
                                 num_tokenizers=1, all_turns=all_turns))
    ids = lambda t: tuple(char_tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    eot = char_tokenizer.convert_tokens_to_ids("<|eot_id|>")

    def sample(chat, k):  # the k-th message answered, everything before it as the prompt
        prompt = char_tokenizer.apply_chat_template(chat[:k], tokenize=False, add_generation_prompt=True)
        return ids(prompt), ids(chat[k]["content"]) + (eot,)

    turns = (1, 3) if all_turns else (3,)
    expected = [sample(c, k) for c in chats for k in turns if not (c is chats[-1] and k == 3)]
    assert sorted(_samples_in_rows(_read_rows(tmp_path / "out"))) == sorted(expected)
    assert stats["records_read"] == 7 and stats["samples_read"] == 7 * len(turns)
    assert stats["samples_packed"] == len(expected) and stats["dropped"]["too_long"] == 1


def test_held_out_records_are_packed_apart_the_same_way_on_every_run(ray_local, tmp_path, tokenizer_dir,
                                                                       char_tokenizer):
    """--holdout-fraction: a record's side comes from its file name and line; every good sample lands in
    exactly one of the two outputs (a chat record's turns together), each packed as the training rows are,
    and the token counts add up."""
    src = tmp_path / "data.jsonl"
    good = [_alpaca(i) for i in range(80)]
    chat = {"messages": [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "ba"},
                         {"role": "user", "content": "abc"}, {"role": "assistant", "content": "cba"}]}
    src.write_text("\n".join([json.dumps(g) for g in good] + [json.dumps(chat), "{broken"]) + "\n")
    out, held = tmp_path / "packed", tmp_path / "heldout"
    opts = PackOptions(inputs=[str(src)], output=str(out), tokenizer=str(tokenizer_dir), seq_len=48, mode="no_split",
                       num_tokenizers=1, pack_batch_size=16, all_turns=True, holdout_fraction=0.25,
                       holdout_output=str(held))
    stats = run_pack(opts)
    train, heldout = _samples_in_rows(_read_rows(out)), _samples_in_rows(_read_rows(held))
    enc = lambda t: tuple(char_tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    eos = char_tokenizer.eos_token_id
    expected = [(enc(g["instruction"] + g["input"]), enc(g["output"]) + (eos,)) for g in good]
    expected += [(enc("ab"), enc("ba") + (eos,)), (enc("abbaabc"), enc("cba") + (eos,))]
    assert sorted(train + heldout) == sorted(expected)  # each good sample once, on one side
    turns = [(enc("ab"), enc("ba") + (eos,)), (enc("abbaabc"), enc("cba") + (eos,))]
    assert all(t in train for t in turns) or all(t in heldout for t in turns)  # a record's turns together
    assert 10 <= len(heldout) <= 32  # about a quarter of 81 records
    assert stats["held_out"]["samples"] == len(heldout) and stats["samples_packed"] == len(train)
    assert stats["tokens_in"] == stats["tokens_out"] + stats["held_out"]["tokens"]
    assert stats["held_out"]["rows_written"] == len(_read_rows(held)) and stats["dropped"]["malformed_json"] == 1
    assert json.loads((held / "stats.json").read_text())["held_out"] == stats["held_out"]
    run_pack(opts)  # the same split again
    assert sorted(_samples_in_rows(_read_rows(held))) == sorted(heldout)


def test_holdout_options_are_checked():
    base = dict(inputs=["d.jsonl"], output="/data/packed", tokenizer="tok")
    with pytest.raises(PipelineError, match=r"--holdout-fraction must be in \[0, 1\), got 1.0"):
        PackOptions(**base, holdout_fraction=1.0, holdout_output="/data/heldout")
    with pytest.raises(PipelineError, match="go together"):
        PackOptions(**base, holdout_fraction=0.1)
    with pytest.raises(PipelineError, match="must lie outside --output"):
        PackOptions(**base, holdout_fraction=0.1, holdout_output="/data/packed/heldout")


def test_fails_fast_on_no_input_no_tokenizer_or_unwritable_output(tmp_path, tokenizer_dir, capsys):
    with pytest.raises(PipelineError, match="no input files"):
        run_pack(PackOptions(inputs=[str(tmp_path / "none*.jsonl")], output=str(tmp_path / "o"), tokenizer=str(tokenizer_dir)))
    (tmp_path / "d.jsonl").write_text(json.dumps(_alpaca(1)))
    with pytest.raises(PipelineError, match="tokenizer"):
        run_pack(PackOptions(inputs=[str(tmp_path / "d.jsonl")], output=str(tmp_path / "o"), tokenizer=str(tmp_path)))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PipelineError, match="cannot write"):
        run_pack(PackOptions(inputs=[str(tmp_path / "d.jsonl")], output=str(blocker / "sub"), tokenizer=str(tokenizer_dir)))
    assert main(["--input", str(tmp_path / "none.jsonl"), "--output", "o", "--tokenizer", str(tokenizer_dir)]) == 2
    assert "no input files" in capsys.readouterr().err


def test_empty_input_file_is_an_error(ray_local, tmp_path, tokenizer_dir):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(PipelineError, match="no records"):
        run_pack(PackOptions(inputs=[str(tmp_path / "empty.jsonl")], output=str(tmp_path / "o"),
                             tokenizer=str(tokenizer_dir), num_tokenizers=1))


TOOLS_TEMPLATE = ("{% if tools %}tools: {% for t in tools %}{{ t.function.name }} {% endfor %}{{ '\\n' }}{% endif %}"
                  "{% for m in messages %}{{ m.role }}: {{ m.content }}"
                  "{% for c in m.tool_calls or [] %}[{{ c.function.name }}]{% endfor %}{{ '\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")
WEATHER = [{"type": "function", "function": {"name": "w", "parameters": {
    "type": "object", "properties": {"c": {"type": "string"}}}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": '{"c": "p"}'}}
WEATHER_CHAT = [{"role": "user", "content": "rain in paris?"},
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "assistant", "content": "no rain"}]


@pytest.fixture(scope="module")
def tool_tokenizer_dir(tmp_path_factory):
    """A character tokenizer with every character a hermes call writes, and a template that shows the tools and
    the earlier turns' calls."""
    tok = dllm.train_tokenizer([TOOLS_TEMPLATE, json.dumps(WEATHER_CHAT), '<tool_call>\n{"name": "w", "arguments": '
                                '{"c": "p"}}\n</tool_call> tools: w assistant: user: tool: sunny no rain abc'],
                               kind="char")
    tok.chat_template = TOOLS_TEMPLATE
    path = tmp_path_factory.mktemp("tooltok")
    tok.save_pretrained(str(path))
    return path


def test_function_calling_chats_answer_with_their_calls_written_in_the_tool_call_format(tool_tokenizer_dir):
    """A record's tools go to the chat template; an assistant turn's tool_calls are its answer written as the model
    learns to write calls (hermes: what the server's tool_call_parser takes back out); earlier calls and the tool's
    result go to the template as they are."""
    from pipelines.pack import conversation_prompt, record_texts
    from serve.tools import ParsedCalls

    tok = dllm.load_tokenizer(tool_tokenizer_dir)
    record = {"tools": WEATHER, "messages": WEATHER_CHAT}

    def texts(rec, chat=True, **kw):
        return record_texts(rec, lambda context, tools: conversation_prompt(tok, chat, context, tools), chat, **kw)

    [(call_prompt, call), (text_prompt, text)] = texts(record, all_turns=True, tool_format="hermes")
    assert call_prompt == "tools: w \nuser: rain in paris?\nassistant: "
    assert call == '<tool_call>\n{"name": "w", "arguments": {"c": "p"}}\n</tool_call>'
    assert ParsedCalls(("w",), "<tool_call>", "</tool_call>").parse(call) == (None, [("w", '{"c": "p"}')])
    assert text_prompt == call_prompt + "[w]\ntool: sunny\nassistant: " and text == "no rain"
    with_text = {"messages": [WEATHER_CHAT[0], {**WEATHER_CHAT[1], "content": "let me see"}]}
    assert texts(with_text, chat=False, tool_format="hermes") == [("rain in paris?", "let me see\n" + call)]
    assert texts({"messages": WEATHER_CHAT}, chat=False, tool_format="hermes")[0][0] == \
        "rain in paris?" + call + "sunny"  # without a template: the earlier call as the model wrote it
    bad_arguments = [WEATHER_CHAT[0], {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "w", "arguments": "{c"}}]}]
    for rec, kw, message in [
            (record, {}, "messages[1] calls tools: give --tool-call-format"),  # the last turn answers the tool's result
            ({"messages": WEATHER_CHAT[:2]}, {}, "messages[1] calls tools: give --tool-call-format"),
            ({"messages": bad_arguments}, {"tool_format": "hermes"}, "messages[1].tool_calls[0].function.arguments is "
                                                                     "not JSON"),
            ({"tools": "w", "messages": WEATHER_CHAT}, {}, "field 'tools' must be a list"),
            ({"messages": [{"role": "user", "content": None}, WEATHER_CHAT[3]]}, {}, "'messages' must be"),
    ]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            texts(rec, all_turns=True, **kw)
    with pytest.raises(ValueError, match="shown to the model by the chat template"):
        texts(record, chat=False, tool_format="hermes")


def test_function_calling_records_pack_with_the_tool_call_format(ray_local, tmp_path, tool_tokenizer_dir):
    calls = [{"tools": WEATHER, "messages": WEATHER_CHAT[:2]}] * 6
    (tmp_path / "tools.jsonl").write_text("".join(json.dumps(r) + "\n" for r in calls) + json.dumps(
        {"messages": [WEATHER_CHAT[0], {"role": "assistant", "tool_calls": [{"function": {"name": "w"}}, 7]}]}) + "\n")
    options = dict(inputs=[str(tmp_path / "tools.jsonl")], tokenizer=str(tool_tokenizer_dir), seq_len=128,
                   mode="no_split", chat_template=True, num_tokenizers=1)
    stats = run_pack(PackOptions(output=str(tmp_path / "out"), tool_call_format="hermes", **options))
    assert stats["samples_packed"] == 6 and stats["dropped"]["wrong_type"] == 1 and sum(stats["dropped"].values()) == 1
    assert "messages[1].tool_calls[1] must be" in stats["dropped_examples"][0] and stats["tool_call_format"] == "hermes"
    tok = dllm.load_tokenizer(tool_tokenizer_dir)
    answers = {tok.decode(list(response)) for _, response in _samples_in_rows(_read_rows(tmp_path / "out"))}
    assert answers == {'<tool_call>\n{"name": "w", "arguments": {"c": "p"}}\n</tool_call><|eot_id|>'}
    unformatted = run_pack(PackOptions(output=str(tmp_path / "plain"), **options))  # calls need a format
    assert unformatted["samples_packed"] == 0 and unformatted["dropped"]["wrong_type"] == 7
    with pytest.raises(PipelineError, match="--tool-call-format must be one of"):
        PackOptions(output=str(tmp_path / "x"), tool_call_format="json", **options)


def test_synthetic_tool_chats_ask_for_a_call_or_text_and_pack_as_the_server_parses_them():
    """tool_choice "auto"'s test bed: the weather question is a call where the tool is offered and a refusal where
    not, the reverse question text either way; packed with our template, a call's answer parses back to the call."""
    from dllm.synthetic import NO_TOOL_ANSWER, TOOL_CHAT_KINDS, WEATHER_TOOL, tool_chats
    from pipelines.pack import conversation_prompt, record_texts
    from serve.tools import TOOL_CALL_PARSERS, ParsedCalls

    chats = tool_chats(300, seed=0, max_word_len=5)
    assert collections.Counter(c["kind"] for c in chats).keys() == set(TOOL_CHAT_KINDS)
    tok = dllm.train_tokenizer([json.dumps(c) for c in chats] + ["<tool_call>\n</tool_call>"], kind="char")
    parser = ParsedCalls(("weather",), *TOOL_CALL_PARSERS["hermes"])
    for chat in chats:
        [(prompt, answer)] = record_texts(chat, lambda context, tools: conversation_prompt(tok, True, context, tools),
                                          True, tool_format="hermes")
        question = chat["messages"][0]["content"]
        assert ("<|start_header_id|>tools" in prompt) == (chat["tools"] == [WEATHER_TOOL]) and question in prompt
        word = question.split()[-1].rstrip("?")
        assert 1 <= len(word) <= 5
        if chat["kind"] == "call":
            assert chat["tools"] and parser.parse(answer) == (None, [("weather", json.dumps({"city": word}))])
        elif chat["kind"] == "no_tool":
            assert not chat["tools"] and answer == NO_TOOL_ANSWER
        else:
            assert answer == word[::-1] and parser.parse(answer) == (answer, [])
