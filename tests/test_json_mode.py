"""JSON mode (response_format="json_object"): the grammar, the left-to-right block rule, the engine's rows."""

import copy
import json
import random
import re

import pytest
import torch

import dllm
from dllm.engine import json_mode
from dllm.engine.json_mode import MAX_WHITESPACE, JsonPrefix, Picker, block_step, check_vocabulary, vocabulary_bytes
from dllm.engine.json_schema import SchemaError, SchemaPrefix, compile_schema
from conftest import JSON_TEXT, make_config

OBJECTS = ['{}', '{"a": 1}', '{"a": [1, 2.5e-3, -0, 1E+2, true, false, null, {"b": "x\\u00e9\\n\\"\\\\"}], "c": {}}',
           '{"é": "日本", "emoji": "🙂"}', '{\n  "k": [ ],\n  "l": [[], {}]\n}', *JSON_TEXT]
NOT_OBJECTS = [b'[]', b'1', b'"s"', b'true', b' {}', b'{"a" 1}', b'{"a":01}', b'{"a":1,}', b'{,}', b'{"a":tru}',
               b'{"a":"\x01"}', b'{}}', b'{"a":-}', b'{"a":1.}', b'{"a":"\\x"}', b'{"a":"\\u12g4"}', b'{a:1}',
               b'{"a":1 2}', b'{} ', b'{"a":[1,]}', b'{"a":"\xff"}', b'{"a":"\xc3("}', b'{"a":.5}', b'{"a":1e}',
               b'{"a":NaN}']


def _feed_bytewise(text: str) -> JsonPrefix | None:
    state = JsonPrefix()
    for byte in text.encode():
        state = state.feed(bytes([byte]))
        if state is None:
            return None
    return state


# ----- the grammar -----------------------------------------------------------------------------

@pytest.mark.parametrize("text", OBJECTS)
def test_every_prefix_of_a_json_object_is_accepted_and_only_the_whole_is_complete(text):
    json.loads(text)
    data = text.encode()
    for cut in range(len(data)):
        state = JsonPrefix().feed(data[:cut])
        assert state is not None and not state.complete, data[:cut]
    assert JsonPrefix().feed(data).complete and _feed_bytewise(text).complete


@pytest.mark.parametrize("text", NOT_OBJECTS)
def test_text_that_no_json_object_begins_with_is_refused(text):
    assert JsonPrefix().feed(text) is None


def test_feeding_returns_a_new_state_and_leaves_the_old_one_as_it_was():
    start = JsonPrefix()
    opened = start.feed(b'{"a"')
    assert opened.feed(b": 1}").complete
    assert opened.feed(b"}") is None  # a key needs its value
    assert start.feed(b"{}").complete  # `start` is still the empty answer


def test_whitespace_between_tokens_is_capped_but_not_inside_strings():
    assert JsonPrefix().feed(b"{" + b" " * MAX_WHITESPACE + b"}").complete
    assert JsonPrefix().feed(b"{" + b" " * (MAX_WHITESPACE + 1)) is None
    assert JsonPrefix().feed(b'{"' + b" " * 500 + b'": 1}').complete


def test_the_grammar_agrees_with_pythons_json_on_mutated_documents():
    """Random edits of valid objects: complete exactly where json.loads reads a dict (with no whitespace around it;
    Python also takes NaN, which the alphabet leaves out)."""
    rng = random.Random(0)
    alphabet = '{}[]",:0123456789-+.eE \\ntrufalsn"x'
    agreed = closed = 0
    for _ in range(4000):
        text = list(rng.choice(OBJECTS[:4] + JSON_TEXT))
        for _ in range(rng.randint(1, 3)):
            op, at = rng.random(), rng.randrange(len(text) + 1)
            if op < 0.4 and at < len(text):
                del text[at]
            elif op < 0.8:
                text.insert(at, rng.choice(alphabet))
            elif at < len(text):
                text[at] = rng.choice(alphabet)
        text = "".join(text)
        try:
            expected = isinstance(json.loads(text), dict) and text == text.strip(" \t\n\r")
        except ValueError:
            expected = False
        state = JsonPrefix().feed(text.encode())
        assert (state is not None and state.complete) == expected, text
        agreed += 1
        closed += expected
    assert agreed == 4000 and 100 < closed < 3900  # both outcomes were exercised


# ----- token bytes -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_token_bytes_concatenate_to_the_decoded_text(kind):
    texts = JSON_TEXT + ["héllo wörld 日本語 🙂 tabs\tand\nlines"]
    tok = dllm.train_tokenizer(texts * 3, kind=kind, vocab_size=300)
    vocab = vocabulary_bytes(tok, len(tok) + 5)
    assert len(vocab) == len(tok) + 5 and vocab[-5:] == [None] * 5  # embedding rows past the tokenizer
    assert all(vocab[i] is None for i in tok.all_special_ids)
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(vocab[i] for i in ids).decode() == tok.decode(ids) == text


def test_a_vocabulary_that_cannot_open_or_close_an_object_is_refused():
    check_vocabulary([None, b"{", b"}"])
    with pytest.raises(ValueError, match="starts a JSON object"):
        check_vocabulary([None, b"a", b"}"])
    with pytest.raises(ValueError, match="'}'"):
        check_vocabulary([None, b"{", b"a"])


# ----- one step of a block ---------------------------------------------------------------------

EOS, MASK = 0, 1
VOCAB = [None, None, b"{", b"}", b'"', b"a", b":", b"1", b" "]
LBRACE, RBRACE, QUOTE, A, COLON, ONE, SPACE = range(2, 9)


def _step(block, candidates, threshold=0.9, picker=Picker(), uniforms=None, start=None, rank_all=None):
    """block_step with each position's candidates given as [(token, probability), ...], most likely first."""
    ids = [[t for t, _ in c] for c in candidates]
    probs = [[p for _, p in c] for c in candidates]
    ranked = rank_all or (lambda j: pytest.fail(f"position {j} ranked the vocabulary"))
    return block_step(start or JsonPrefix(), block, MASK, EOS, VOCAB, ids, probs, threshold, picker,
                      uniforms or [0.0] * len(block), ranked)


def test_the_first_masked_position_takes_its_most_likely_valid_token_and_eos_follows_the_closed_object():
    commits = _step([MASK] * 4, [[(RBRACE, 0.9), (LBRACE, 0.05)], [(RBRACE, 0.95)], [(A, 1.0)], [(A, 1.0)]])
    assert commits == {0: LBRACE, 1: RBRACE, 2: EOS, 3: EOS}


def test_positions_after_the_first_commit_while_their_valid_token_clears_the_threshold():
    candidates = [[(LBRACE, 0.99)], [(QUOTE, 0.95)], [(A, 0.5)], [(QUOTE, 0.99)]]
    assert _step([MASK] * 4, candidates) == {0: LBRACE, 1: QUOTE}  # stops at the first unsure one, skips nothing
    assert _step([MASK] * 4, candidates, threshold=0.4) == {0: LBRACE, 1: QUOTE, 2: A, 3: QUOTE}


def test_the_blocks_committed_prefix_and_earlier_blocks_are_the_grammars_state():
    # After '{' a key must open: ':' is skipped for '"'.
    assert _step([LBRACE, MASK, MASK], [[], [(COLON, 0.99), (QUOTE, 0.01)], [(A, 0.1)]]) == {1: QUOTE}
    # The same with '{' from an earlier block.
    assert _step([MASK, MASK], [[(COLON, 0.99), (QUOTE, 0.01)], [(A, 0.1)]], start=JsonPrefix().feed(b"{")) == {0: QUOTE}
    assert _step([MASK], [[(A, 1.0)]], start=JsonPrefix().feed(b"{}")) == {0: EOS}  # closed in an earlier block


def test_a_position_whose_top_tokens_all_break_the_grammar_ranks_the_whole_vocabulary():
    asked = []

    def rank_all(j):
        asked.append(j)
        return [RBRACE, COLON, LBRACE, A], [0.9, 0.05, 0.03, 0.02]

    assert _step([MASK, MASK], [[(RBRACE, 0.9)], [(QUOTE, 0.5)]], rank_all=rank_all) == {0: LBRACE}
    assert asked == [0]


def test_a_vocabulary_with_nothing_to_continue_the_object_ends_the_answer():
    vocab = [None, None, b"{", b"a"]
    commits = block_step(JsonPrefix().feed(b"{"), [MASK, MASK], MASK, EOS, vocab, [[3], [3]], [[1.0], [1.0]], 0.9,
                         Picker(), [0.0, 0.0], lambda j: ([3, 2], [1.0, 0.0]))
    assert commits == {0: EOS, 1: EOS}


def test_sampling_draws_among_the_valid_tokens_by_their_tempered_probability():
    state = JsonPrefix().feed(b'{"a":')
    valid = [(ONE, 0.6, state.feed(b"1")), (SPACE, 0.3, state.feed(b" ")), (QUOTE, 0.1, state.feed(b'"'))]
    plain = Picker(temperature=1.0)
    assert [plain.pick(valid, u)[0] for u in (0.0, 0.59, 0.61, 0.89, 0.91, 0.999)] == [ONE, ONE, SPACE, SPACE, QUOTE,
                                                                                        QUOTE]
    assert Picker(temperature=1.0, top_k=1).pick(valid, 0.999)[0] == ONE
    assert Picker(temperature=1.0, top_p=0.5).pick(valid, 0.999)[0] == ONE
    assert Picker(temperature=1.0, min_p=0.4).pick(valid, 0.999)[0] == SPACE  # 0.1 < 0.4 x 0.6: dropped
    cold = Picker(temperature=0.25)  # weights 0.6^4 : 0.3^4 : 0.1^4, the first with 94 % of them
    assert cold.pick(valid, 0.93)[0] == ONE and cold.pick(valid, 0.95)[0] == SPACE
    # Greedy takes the first valid candidate without looking at the rest.
    assert _step([MASK], [[(COLON, 0.9), (LBRACE, 0.05), (SPACE, 0.05)]], picker=Picker()) == {0: LBRACE}


# ----- the engine --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def json_model(json_tokenizer):
    return dllm.build_model(make_config(json_tokenizer), seed=0)


def _json_engine(model, tokenizer, **kw):
    return dllm.Engine(model, tokenizer, max_batch_size=kw.pop("max_batch_size", 8), max_model_len=256, **kw)


PROMPTS = ["reverse: abc =>", "add 1+2 =>", '{"name":', "Hello world"]


def _is_json_prefix(text: str) -> JsonPrefix | None:
    return JsonPrefix().feed(text.encode())


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_answers_are_json_object_prefixes_and_end_where_the_object_closes(json_model, json_tokenizer, block_size,
                                                                              temperature):
    engine = _json_engine(json_model, json_tokenizer)
    closing = json_tokenizer.convert_tokens_to_ids("}")
    configs = [dllm.GenerationConfig(block_size=block_size, max_new_tokens=48, response_format="json_object",
                                     temperature=temperature, seed=s, logit_bias=bias)
               for s, bias in ((0, None), (1, None), (2, {closing: 4.0}), (3, {closing: 100.0}))]
    gens = [engine.generate([p], c)[0] for p, c in zip(PROMPTS, configs)]
    for gen in gens:
        state = _is_json_prefix(gen.text)
        assert state is not None, gen.text
        assert gen.token_ids == json_tokenizer(gen.text, add_special_tokens=False)["input_ids"]  # no EOS kept
        if gen.finish_reason == "stop":
            assert state.complete and isinstance(json.loads(gen.text), dict)
        else:
            assert gen.finish_reason == "length" and len(gen.token_ids) == 48 and not state.complete
    assert gens[3].finish_reason == "stop" and gens[3].text.strip() == "{}"  # '}' favoured: it closes at once


def test_json_rows_leave_the_other_rows_answers_as_they_are(json_model, json_tokenizer):
    plain = dllm.GenerationConfig(block_size=8, max_new_tokens=32)
    sampled = plain.replace(temperature=1.0, seed=5, top_k=20)
    alone = [_json_engine(json_model, json_tokenizer).generate([p], c)[0].token_ids
             for p, c in ((PROMPTS[0], plain), (PROMPTS[1], sampled))]
    engine = _json_engine(json_model, json_tokenizer)
    ids = [engine.add_request(PROMPTS[0], plain), engine.add_request(PROMPTS[2], plain.replace(
        response_format="json_object")), engine.add_request(PROMPTS[1], sampled),
           engine.add_request(PROMPTS[3], sampled.replace(response_format="json_object"))]
    done = {}
    while engine.has_unfinished():
        done.update((o.request_id, o.generation) for o in engine.step() if o.finished)
    assert [done[ids[0]].token_ids, done[ids[2]].token_ids] == alone
    assert all(_is_json_prefix(done[i].text) is not None for i in ids[1::2])


def test_a_seed_gives_the_same_json_answer_and_streams_add_up_to_it(json_model, json_tokenizer):
    cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=40, response_format="json_object", temperature=1.0,
                                seed=11, stream_settled=True)
    engine = _json_engine(json_model, json_tokenizer)
    first = engine.generate([PROMPTS[0]], cfg)[0]
    engine.add_request(PROMPTS[0], cfg)
    streamed, final = "", None
    while engine.has_unfinished():
        for out in engine.step():
            streamed += out.new_text
            final = out.generation or final
    assert final.token_ids == first.token_ids and streamed == first.text == final.text
    other = engine.generate([PROMPTS[0]], cfg.replace(seed=12))[0]
    assert other.token_ids != first.token_ids  # the seed matters: sampling is not greedy in disguise


def test_json_mode_commits_left_to_right_and_more_than_one_position_where_the_model_is_sure(json_tokenizer):
    """A model sharpened so that its top tokens pass the threshold: the trajectory shows each block filled from the
    left, several positions in one step somewhere."""
    model = dllm.build_model(make_config(json_tokenizer), seed=3)
    with torch.no_grad():
        model.model.transformer["ff_out"].weight.mul_(60.0)
    engine = _json_engine(model, json_tokenizer)
    gen = engine.generate([PROMPTS[1]], dllm.GenerationConfig(block_size=8, max_new_tokens=48, threshold=0.5,
                                                              response_format="json_object", record_trajectory=True))[0]
    assert _is_json_prefix(gen.text) is not None
    for block in gen.trajectory:
        steps = [s for s in block.reveal_step if s >= 0]
        assert steps == sorted(steps)  # never a position before one on its left
    assert any(len(b.reveal_step) > len(set(b.reveal_step)) for b in gen.trajectory)


@pytest.mark.gpu
def test_json_rows_on_cuda_decode_under_graphs_what_they_decode_eagerly(json_model, json_tokenizer):
    """On the GPU: JSON rows (greedy, sampled) beside a free row, with CUDA graphs and compiled blocks and without."""
    bf16 = copy.deepcopy(json_model).to("cuda", torch.bfloat16)
    free = dllm.GenerationConfig(block_size=8, max_new_tokens=32)
    settings = [free.replace(response_format="json_object"), free,
                free.replace(response_format="json_object", temperature=1.0, seed=2)]
    expected = dllm.Engine(copy.deepcopy(bf16), json_tokenizer, max_model_len=256, cuda_graphs=False,
                           compile_blocks=False).generate(PROMPTS[:3], settings)
    engine = dllm.Engine(copy.deepcopy(bf16), json_tokenizer, max_model_len=256, cuda_graphs=True, compile_blocks=True)
    graphed = engine.generate(PROMPTS[:3], settings)
    assert engine.graphs.replays > 0
    assert [g.token_ids for g in graphed] == [g.token_ids for g in expected]
    assert all(_is_json_prefix(graphed[i].text) is not None for i in (0, 2))


def test_json_mode_needs_a_tokenizer_that_can_write_json(json_model, json_tokenizer, tiny_config, char_tokenizer,
                                                         monkeypatch):
    cfg = dllm.GenerationConfig(response_format="json_object", max_new_tokens=8)
    with pytest.raises(ValueError, match="needs an Engine with a tokenizer"):
        dllm.Engine(json_model, max_model_len=128).add_request([5, 6], cfg)
    no_braces = dllm.Engine(dllm.build_model(tiny_config, seed=0), char_tokenizer, max_model_len=128)
    with pytest.raises(ValueError, match="starts a JSON object"):
        no_braces.add_request("x", cfg)
    reads = []
    monkeypatch.setattr(json_mode, "vocabulary_bytes", lambda *a: reads.append(a) or [b"x"])
    fresh = dllm.Engine(dllm.build_model(tiny_config, seed=0), char_tokenizer, max_model_len=128)
    for _ in range(3):  # every JSON request refused, the vocabulary read once
        with pytest.raises(ValueError, match="starts a JSON object"):
            fresh.add_request("x", cfg)
    assert len(reads) == 1


@pytest.mark.parametrize("changes,name", [({"decoder": "credit"}, "decoder"), ({"ignore_eos": True}, "ignore_eos"),
                                          ({"min_tokens": 3}, "min_tokens"),
                                          ({"response_format": "yaml"}, "response_format"),
                                          ({"response_format": "json_schema"}, "json_schema"),
                                          ({"response_format": "json_schema", "json_schema": {"type": "array"}},
                                           "json_schema"),
                                          ({"json_schema": {"type": "object"}, "response_format": None}, "json_schema")])
def test_settings_json_mode_cannot_honour_are_refused_by_name(changes, name):
    with pytest.raises(ValueError, match=f"GenerationConfig.{name}="):
        dllm.GenerationConfig(**{"response_format": "json_object", **changes})


def test_the_record_task_answers_with_the_json_object_of_its_prompts_fields_and_is_asked_for_by_name():
    from dllm.synthetic import RECORD_SCHEMA, make_samples

    samples = make_samples(300, seed=4, tasks=["record"], max_word_len=5)
    for s in samples:
        record = json.loads(s["output"])
        words = dict(field.split(" ", 1) if " " in field else (field, "") for field in
                     s["instruction"].removeprefix("record ").removesuffix(" = ").split("; "))
        assert list(record) == list(words)
        shown = {"name": record.get("name"), "age": str(record.get("age")), "tags": " ".join(record.get("tags", [])),
                 "ok": "yes" if record.get("ok") else "no"}
        assert all(words[k] == shown[k] for k in words)
    assert len({s["output"] for s in samples}) > 200  # varied: 1-2 of 4 fields, each drawn
    assert "record" not in {s["task"] for s in make_samples(500, seed=4)}  # not in the default mix
    assert all(_held(s["output"], RECORD_SCHEMA).complete for s in samples)  # its schema holds every answer


# ----- held to a JSON Schema ----------------------------------------------------------------------

PET = {"type": "object", "title": "Pet", "properties": {
    "kind": {"enum": ["cat", "dog"]},
    "child": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}], "default": None}}, "required": ["kind"]}
PERSON = {"type": "object", "title": "Person", "additionalProperties": False, "required": ["name", "age"], "properties": {
    "name": {"type": "string", "description": "any string"},
    "age": {"type": "integer"},
    "height": {"type": ["number", "null"]},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "é"]}, "minItems": 1, "maxItems": 2},
    "ok": {"type": "boolean"},
    "pet": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}]},
    "extra": {}}, "$defs": {"Pet": PET}}


def _valid(value, schema, defs=PERSON["$defs"]) -> bool:
    """An independent check of the supported keywords on decoded values (what the automaton must agree with)."""
    if "$ref" in schema:
        return _valid(value, defs[schema["$ref"].rsplit("/", 1)[1]])
    if "anyOf" in schema:
        return any(_valid(value, branch) for branch in schema["anyOf"])
    if "enum" in schema:
        return value in schema["enum"]
    types = schema.get("type")
    if types is None:
        return True
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    for t in types if isinstance(types, list) else [types]:
        if t in kinds and type(value) is kinds[t] or t == "integer" and type(value) is int or t == "number" and type(
                value) in (int, float):
            if t == "object":
                props = schema.get("properties", {})
                return (set(value) <= set(props) and set(schema.get("required", [])) <= set(value)
                        and schema.get("minProperties", 0) <= len(value) <= schema.get("maxProperties", len(value))
                        and all(_valid(v, props[k]) for k, v in value.items()))
            if t == "array":
                return (schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value))
                        and all(_valid(v, schema["items"]) for v in value))
            return True
    return False


def _held(text: str | bytes, schema=PERSON):
    return SchemaPrefix(compile_schema(schema)).feed(text.encode() if isinstance(text, str) else text)


VALID_PEOPLE = ['{"name": "Ada", "age": 36}', '{"age": -1, "name": ""}',
                '{"name": "x", "age": 0, "height": 1.75e2, "tags": ["é", "a"], "ok": true, "pet": null, "extra": [1]}',
                '{"name": "x", "age": 1, "height": null, "pet": {"kind": "cat", "child": {"kind": "dog", "child": null}}}']
INVALID_PEOPLE = ['{"name": "Ada"}', '{"name": "Ada", "age": 3.5}', '{"name": 1, "age": 3}', '{"nam": "x", "age": 1}',
                  '{"name": "x", "age": 1, "name": "y"}', '{"name": "x", "age": 1, "tags": []}',
                  '{"name": "x", "age": 1, "tags": ["a", "b", "a"]}', '{"name": "x", "age": 1, "tags": ["c"]}',
                  '{"name": "x", "age": 1, "pet": {"child": null}}', '{"name": "x", "age": 1, "pet": {"kind": "cow"}}',
                  '{"name": "x", "age": 1e3}', '{"name": "x", "age": 1, "other": 1}', '{"name": "x", "age": 1,}']


@pytest.mark.parametrize("text", VALID_PEOPLE)
def test_an_object_the_schema_allows_is_accepted_byte_by_byte(text):
    assert _valid(json.loads(text), PERSON)
    data = text.encode()
    for cut in range(len(data)):
        state = _held(data[:cut])
        assert state is not None and not state.complete, data[:cut]
    assert _held(data).complete


@pytest.mark.parametrize("text", INVALID_PEOPLE)
def test_an_object_the_schema_does_not_allow_is_refused(text):
    state = _held(text)
    assert state is None or not state.complete


def test_the_schema_automaton_agrees_with_a_validator_on_mutated_objects():
    """Random edits of allowed objects: complete exactly where the text is JSON that the schema allows."""
    rng = random.Random(1)
    alphabet = '{}[]",:0123456789-.e \\ntrufalsnckdgéabx'
    agreed = allowed = 0
    for _ in range(3000):
        text = list(rng.choice(VALID_PEOPLE))
        for _ in range(rng.randint(1, 2)):
            at = rng.randrange(len(text))
            op = rng.random()
            if op < 0.4:
                del text[at]
            elif op < 0.8:
                text.insert(at, rng.choice(alphabet))
            else:
                text[at] = rng.choice(alphabet)
        text = "".join(text)
        try:
            value = json.loads(text)
            expected = isinstance(value, dict) and _valid(value, PERSON) and text == text.strip()
            # keys as json.dumps writes them, and no key twice (json.loads keeps the last)
            expected = expected and text.count('"name"') <= 1 and "\\u" not in text
        except ValueError:
            expected = False
        state = _held(text)
        assert (state is not None and state.complete) == expected, text
        agreed += 1
        allowed += expected
    assert agreed == 3000 and 30 < allowed < 2970


ONE_OR_TWO = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "boolean"}},
              "minProperties": 1, "maxProperties": 2}


def test_min_and_max_properties_bound_the_keys_an_object_holds():
    for text in ['{"a": 1}', '{"c": true, "b": "x"}']:
        data = text.encode()
        assert all(not _held(data[:cut], ONE_OR_TWO).complete for cut in range(len(data))) and _held(data, ONE_OR_TWO).complete
    assert _held('{}', ONE_OR_TWO) is None and _held('{"a": 1, "b": "x",', ONE_OR_TWO) is None
    rng = random.Random(2)
    alphabet = '{}",:0123456789 abctruefals'
    allowed = 0
    for _ in range(1500):
        text = list(rng.choice(['{"a": 1}', '{"c": true, "b": "x"}', '{"a": 12, "c": false}']))
        for _ in range(rng.randint(1, 2)):
            at = rng.randrange(len(text))
            if rng.random() < 0.5:
                text.insert(at, rng.choice(alphabet))
            else:
                del text[at]
        text = "".join(text)
        try:
            value = json.loads(text)
            expected = isinstance(value, dict) and _valid(value, ONE_OR_TWO) and text == text.strip() and all(
                text.count(f'"{k}"') <= 1 for k in "abc")
        except ValueError:
            expected = False
        state = _held(text, ONE_OR_TWO)
        assert (state is not None and state.complete) == expected, text
        allowed += expected
    assert 30 < allowed < 1470


@pytest.mark.parametrize("schema,message", [
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}}, "pattern at #/properties/a"),
    ({"type": "object", "minProperties": 1}, "supported beside properties only"),
    ({"type": "object", "properties": {"a": {}}, "minProperties": 2}, "no object of its properties fits"),
    ({"type": "object", "properties": {"a": {}, "b": {}}, "required": ["a", "b"], "maxProperties": 1},
     "no object of its properties fits"),
    ({"type": "object", "properties": {"a": {}}, "maxProperties": -1}, "minProperties / maxProperties at the root"),
    ({"type": "object", "properties": {"t": {"type": "string", "format": "date-time"}}}, "format at #/properties/t"),
    ({"type": "array"}, "root of a response_format schema must be an object"),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": True}, "additionalProperties at the root"),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, "additionalProperties at the root"),
    ({"anyOf": [{"type": "object"}, {"type": "object", "properties": {}}]}, "two branches allow object values"),
    ({"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/A"}}}, "refers to itself"),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}, "only references to #/$defs"),
    ({"type": "object", "properties": {"a": {"enum": [1, 2]}}}, "only strings and null"),
    ({"type": "object", "properties": {"a": {"type": "array", "items": [{}, {}]}}}, "tuple validation"),
    ({"type": "object", "properties": {"a": {"type": "date"}}}, "type 'date' at #/properties/a"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required at the root"),
    ("not a schema", "must be a JSON object")])
def test_a_schema_with_what_answers_would_not_be_held_to_is_refused_with_where(schema, message):
    with pytest.raises(SchemaError, match=re.escape(message)):
        compile_schema(schema)


def test_engine_answers_held_to_a_schema_are_objects_it_allows(json_model, json_tokenizer):
    """A schema whose objects are short: every answer closes within the cap (8 gaps of at most MAX_WHITESPACE
    whitespace bytes, a character a token, and at most 30 characters of content) and is one the schema allows."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "pet": {"enum": ["cat", "dog"]}},
              "required": ["ok", "pet"]}
    engine = _json_engine(json_model, json_tokenizer)
    cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=8 * MAX_WHITESPACE + 32, response_format="json_schema",
                                json_schema=schema)
    configs = [cfg, cfg.replace(temperature=1.0, seed=3), cfg.replace(temperature=1.0, seed=4, block_size=16)]
    gens = [engine.generate([p], c)[0] for p, c in zip(PROMPTS, configs)]
    for gen in gens:
        assert gen.finish_reason == "stop", gen.text
        value = json.loads(gen.text)
        assert _valid(value, schema) and set(value) == {"ok", "pet"}, gen.text


def test_a_pydantic_models_schema_holds_its_own_json():
    """What clients send most: a pydantic model's model_json_schema() ($defs, a recursive Optional, Literal, lists,
    defaults, titles); the model's own JSON is held, and the validator pydantic runs agrees with what is refused."""
    from typing import Literal, Optional

    from pydantic import BaseModel, ValidationError

    class Pet(BaseModel):
        kind: Literal["cat", "dog"]
        child: Optional["Pet"] = None

    class Person(BaseModel):
        name: str
        age: int
        tags: list[str] = []
        height: Optional[float] = None
        pet: Optional[Pet] = None

    schema = Person.model_json_schema()
    person = Person(name="Ada", age=36, tags=["x"], height=1.7, pet=Pet(kind="cat", child=Pet(kind="dog")))
    assert _held(person.model_dump_json(), schema).complete
    assert _held(json.dumps(person.model_dump()), schema).complete  # with spaces
    for text in ['{"name": "Ada"}', '{"name": "Ada", "age": 1, "pet": {"kind": "cow"}}', '{"name": "A", "age": "1"}']:
        with pytest.raises(ValidationError):
            Person.model_validate_json(text, strict=True)
        state = _held(text, schema)
        assert state is None or not state.complete


@pytest.mark.parametrize("mode", dllm.engine.PREEMPTION_MODES)
def test_preempted_json_rows_resume_with_the_answers_they_get_alone(json_model, json_tokenizer, mode):
    """A pool that holds about 1.5 answers: JSON rows (greedy, sampled, held to a schema) are preempted as the older
    ones grow, their K/V swapped out or rebuilt; the grammar's state travels with the request."""
    cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=32, response_format="json_object")
    cfgs = [cfg, cfg.replace(temperature=1.0, seed=7), cfg.replace(response_format="json_schema", json_schema={
        "type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array"}}}), cfg] * 2
    prompts = [p + str(k) for k, p in enumerate(PROMPTS * 2)]
    alone = [_json_engine(json_model, json_tokenizer, prefix_caching=False).generate([p], c)[0]
             for p, c in zip(prompts, cfgs)]
    probe = _json_engine(json_model, json_tokenizer, page_size=4)
    need = max(probe.cache.pages_for(len(probe.encode(p)) + 32) for p in prompts)
    engine = _json_engine(json_model, json_tokenizer, prefix_caching=False, page_size=4, preemption_mode=mode,
                          kv_cache_tokens=int(1.5 * need) * 4)
    gens = engine.generate(prompts, cfgs)
    assert engine.stats()["preemptions"] >= 1
    assert [g.token_ids for g in gens] == [a.token_ids for a in alone]
    assert all(_is_json_prefix(g.text) is not None for g in gens)
