"""The Ray Serve application on a local Ray, over real HTTP, with the official openai client."""

import concurrent.futures as cf
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch

import dllm

pytestmark = pytest.mark.slow

APP_ARGS = {"max_model_len": 256, "num_cpus": 0.25, "ingress_num_cpus": 0.25, "max_batch_size": 8,
            "max_block_size": 16, "decoding": {"block_size": 8, "max_tokens": 48}}


# A request that hangs fails its test in two minutes, not in the openai client's default of ten.
CLIENT_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, talkative_model, char_tokenizer):
    path = tmp_path_factory.mktemp("served") / "tiny"
    dllm.save_pretrained(talkative_model, char_tokenizer, path)
    return path


@pytest.fixture(scope="module")
def endless_dir(tmp_path_factory, confident_model, char_tokenizer):
    """A model that never writes EOS at block size 1: such a request runs until aborted or max_tokens."""
    path = tmp_path_factory.mktemp("endless") / "tiny"
    dllm.save_pretrained(confident_model, char_tokenizer, path)
    return path


@pytest.fixture(scope="module")
def server(ray_local, model_dir, endless_dir):
    from ray import serve

    from serve.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": str(model_dir), **APP_ARGS}), name="main", route_prefix="/")
    serve.run(build_app({"model": str(model_dir), **APP_ARGS, "api_keys": "k1,k2", "kv_cache_tokens": 512,
                         "preemption_mode": "recompute", "quantization": "fp8",  # FP8 weights
                         "scheduling_policy": "priority", "max_prefill_tokens": 64}),
              name="secure", route_prefix="/secure")  # a pool of a quarter of max_batch_size x max_model_len
    template = endless_dir.parent / "chat.jinja"  # the operator's template, which demands a system message
    template.write_text(SYSTEM_FIRST_TEMPLATE)
    serve.run(build_app({"model": str(endless_dir), **APP_ARGS, "chat_template": str(template)}), name="endless",
              route_prefix="/endless")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


SYSTEM_FIRST_TEMPLATE = ("{% if messages[0].role != 'system' %}{{ raise_exception('a system message must come first') }}"
                         "{% endif %}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S)


def _engine_info(app="main"):
    from ray import serve

    return serve.get_deployment_handle("EngineServer", app_name=app).info.remote().result()


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_completion_with_the_openai_client_matches_the_engine(client, model_dir):
    out = client.completions.create(model="tiny", prompt="reverse: abc =>", max_tokens=40)
    engine = dllm.Engine(dllm.load_model(model_dir), dllm.load_tokenizer(model_dir), max_model_len=256)
    server_defaults = dllm.GenerationConfig(block_size=8, max_new_tokens=40, early_stop=True, stops_last=True)
    direct = engine.generate(["reverse: abc =>"], server_defaults)[0]
    assert out.choices[0].text == direct.text and direct.text
    assert out.choices[0].finish_reason == direct.finish_reason
    assert out.usage.completion_tokens == len(direct.token_ids)
    assert out.usage.prompt_tokens == len("reverse: abc =>")
    assert out.model_extra["dllm"]["forwards"] == direct.num_forwards


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_text_equals_non_streamed_text_for_the_same_seed(client, chat):
    kw = dict(model="tiny", max_tokens=48, temperature=1.0, seed=7)
    if chat:
        msgs = [{"role": "user", "content": "sort: dcba =>"}]
        full = client.chat.completions.create(messages=msgs, **kw)
        chunks = list(client.chat.completions.create(messages=msgs, stream=True, **kw))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == full.choices[0].message.content != ""
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    else:
        full = client.completions.create(prompt="sort: dcba =>", **kw)
        chunks = list(client.completions.create(prompt="sort: dcba =>", stream=True, **kw))
        assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text != ""
        assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert len(chunks) >= 2


def test_a_stream_sends_each_blocks_settled_prefix_before_the_block_ends(client):
    """Streams decode with stream_settled: more text chunks than blocks, adding up to the answer."""
    kw = dict(model="tiny", prompt="sort: dcba =>", max_tokens=48, extra_body={"block_size": 16, "ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, **kw))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts) == full.choices[0].text
    assert len(texts) > full.model_extra["dllm"]["blocks"] == 3


def test_n_samples_per_prompt_and_prompt_lists_match_the_engine_seed_by_seed(client, model_dir):
    engine = dllm.Engine(dllm.load_model(model_dir), dllm.load_tokenizer(model_dir), max_model_len=256)
    prompts = ["sort: dcba =>", "reverse: abc =>"]
    out = client.completions.create(model="tiny", prompt=prompts, n=3, temperature=1.0, seed=11, max_tokens=32)
    assert [c.index for c in out.choices] == list(range(6))  # prompt index * n + sample index
    direct = [engine.generate([p], dllm.GenerationConfig(block_size=8, max_new_tokens=32, early_stop=True,
                                                         stops_last=True, temperature=1.0, seed=11 + i))[0]
              for p in prompts for i in range(3)]
    assert [c.text for c in out.choices] == [d.text for d in direct]
    assert len({d.text for d in direct[:3]}) == 3  # the seeds differ, so do the samples
    assert [c.finish_reason for c in out.choices] == [d.finish_reason for d in direct]
    assert out.usage.prompt_tokens == sum(map(len, prompts))  # each prompt counted once, not n times
    assert out.usage.completion_tokens == sum(len(d.token_ids) for d in direct)
    assert out.model_extra["dllm"]["forwards"] == sum(d.num_forwards for d in direct)


def test_a_prompt_asked_again_reports_its_prompt_tokens_as_cached(client, server):
    """The second request finds the prompt's K/V in the replica's prefix cache: the same answer, and
    usage.prompt_tokens_details.cached_tokens says so (for streams too)."""
    prompt = [21, 22, 23, 24, 25, 26, 27, 28, 29]  # asked by no other test
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, n=2)
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, n=2)
    assert [c.text for c in again.choices] == [c.text for c in first.choices]
    assert first.usage.prompt_tokens == again.usage.prompt_tokens == len(prompt)
    assert (first.usage.prompt_tokens_details.cached_tokens, again.usage.prompt_tokens_details.cached_tokens) == (0, 9)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-2])["usage"]["prompt_tokens_details"] == {"cached_tokens": 9}


def test_token_id_prompt_lists_and_echo(client, model_dir):
    tok = dllm.load_tokenizer(model_dir)
    ids = [tok("add 1+2 =>", add_special_tokens=False)["input_ids"], tok("sort: ba =>", add_special_tokens=False)["input_ids"]]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=24)
    by_text = client.completions.create(model="tiny", prompt=["add 1+2 =>", "sort: ba =>"], max_tokens=24)
    assert [c.text for c in by_ids.choices] == [c.text for c in by_text.choices]
    echoed = client.completions.create(model="tiny", prompt=["add 1+2 =>", "sort: ba =>"], max_tokens=24, echo=True)
    assert [c.text for c in echoed.choices] == ["add 1+2 =>" + by_text.choices[0].text,
                                                "sort: ba =>" + by_text.choices[1].text]
    chunks = list(client.completions.create(model="tiny", prompt=ids[0], max_tokens=24, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_choices_carry_their_index_and_equal_the_non_streamed_ones(server, client, chat):
    kw = dict(model="tiny", max_tokens=40, temperature=1.0, seed=5, n=3)
    if chat:
        msgs = [{"role": "user", "content": "reverse: abcd =>"}]
        full = [c.message.content for c in client.chat.completions.create(messages=msgs, **kw).choices]
        chunks = list(client.chat.completions.create(messages=msgs, stream=True, **kw))
        pieces = [(c.choices[0].index, c.choices[0].delta.content or "") for c in chunks]
        first_of = {}
        for c in chunks:
            first_of.setdefault(c.choices[0].index, c.choices[0].delta)
        assert all(delta.role == "assistant" for delta in first_of.values())
    else:
        full = [c.text for c in client.completions.create(prompt="reverse: abcd =>", **kw).choices]
        chunks = list(client.completions.create(prompt="reverse: abcd =>", stream=True, **kw))
        pieces = [(c.choices[0].index, c.choices[0].text) for c in chunks]
    streamed = ["".join(text for i, text in pieces if i == index) for index in range(3)]
    assert streamed == full and len(set(full)) > 1
    finishes = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1, 2]


def test_stop_token_ids_end_the_answer_like_the_engines(client, model_dir):
    tok = dllm.load_tokenizer(model_dir)
    engine = dllm.Engine(dllm.load_model(model_dir), tok, max_model_len=256)
    cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=40, early_stop=True, stops_last=True)
    prompt = "reverse: abcd =>"
    full = engine.generate([prompt], cfg)[0]
    stop_id = tok("v", add_special_tokens=False)["input_ids"][0]
    assert stop_id in full.token_ids[1:]  # the answer holds the stop token after some content
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, extra_body={"stop_token_ids": [stop_id]})
    direct = engine.generate([prompt], cfg.replace(stop_token_ids=[stop_id]))[0]
    assert out.choices[0].text == direct.text and "v" not in direct.text
    assert out.choices[0].finish_reason == "stop"


def test_logprobs_are_the_engines_in_openais_completion_and_chat_shapes(client, model_dir):
    tok = dllm.load_tokenizer(model_dir)
    engine = dllm.Engine(dllm.load_model(model_dir), tok, max_model_len=256)
    cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=40, early_stop=True, stops_last=True, logprobs=2)
    direct = engine.generate(["reverse: abc =>"], cfg)[0]
    lp = client.completions.create(model="tiny", prompt="reverse: abc =>", max_tokens=40, logprobs=2).choices[0].logprobs
    assert lp.tokens == [tok.decode([e.token_id]) for e in direct.logprobs] and "".join(lp.tokens) == direct.text
    assert lp.token_logprobs == pytest.approx([e.logprob for e in direct.logprobs], abs=1e-5)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    for top, e in zip(lp.top_logprobs, direct.logprobs):  # the 2 alternatives and the chosen token
        expected = {tok.decode([t]): v for t, v in [*e.top, (e.token_id, e.logprob)]}
        assert top.keys() == expected.keys() and list(top.values()) == pytest.approx(list(expected.values()), abs=1e-5)

    msgs = [{"role": "user", "content": "sort: dcba =>"}]
    out = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert "".join(c.token for c in content) == out.choices[0].message.content != ""
    assert all(len(c.top_logprobs) == 3 and c.bytes == list(c.token.encode()) and c.logprob <= 0 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.logprob for c in content)  # greedy: the chosen token is the most likely
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=40)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == out.choices[0].message.content


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_logprobs_add_up_to_the_non_streamed_ones(client, chat):
    kw = dict(model="tiny", max_tokens=40, temperature=1.0, seed=3, n=2)
    if chat:
        kw.update(messages=[{"role": "user", "content": "reverse: abcd =>"}], logprobs=True, top_logprobs=1)
        full = [[(c.token, c.logprob) for c in ch.logprobs.content] for ch in client.chat.completions.create(**kw).choices]
        chunks = list(client.chat.completions.create(stream=True, **kw))
        pieces = [(c.choices[0].index, [(x.token, x.logprob) for x in c.choices[0].logprobs.content])
                  for c in chunks if c.choices[0].logprobs]
    else:
        kw.update(prompt="reverse: abcd =>", logprobs=1)
        full = [list(zip(ch.logprobs.tokens, ch.logprobs.token_logprobs, ch.logprobs.text_offset))
                for ch in client.completions.create(**kw).choices]
        chunks = list(client.completions.create(stream=True, **kw))
        pieces = [(c.choices[0].index, list(zip(c.choices[0].logprobs.tokens, c.choices[0].logprobs.token_logprobs,
                                                c.choices[0].logprobs.text_offset)))
                  for c in chunks if c.choices[0].logprobs]
    streamed = [[x for i, part in pieces if i == index for x in part] for index in range(2)]
    # The same tokens; logprobs up to rounding (the two requests' choices may share forwards differently).
    assert [[x[::2] for x in choice] for choice in streamed] == [[x[::2] for x in choice] for choice in full]
    assert [x[1] for choice in streamed for x in choice] == pytest.approx([x[1] for choice in full for x in choice],
                                                                          abs=1e-5)
    assert all(full)
    assert len([part for _, part in pieces if part]) > 2  # several blocks per answer, each with its tokens


def test_loglikelihood_ranks_continuations_with_the_engines_estimate(server, model_dir):
    tok = dllm.load_tokenizer(model_dir)
    model = dllm.load_model(model_dir)
    prompt, conts = "sort: dcba =>", [" abcd", " dcba", " x"]
    body = {"model": "tiny", "prompt": prompt, "continuations": conts, "mc_samples": 16, "seed": 2}
    r = httpx.post(f"{server}/v1/loglikelihood", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    for item, cont in zip(data, conts):
        direct = dllm.log_likelihood(model, ids, tok(cont, add_special_tokens=False)["input_ids"], mc_samples=16, seed=2)
        assert item["loglikelihood"] == pytest.approx(direct.value, abs=1e-4)
        assert item["std_error"] == pytest.approx(direct.std_error, abs=1e-4) and item["tokens"] == len(cont)
    assert [item["index"] for item in data] == [0, 1, 2]
    by_ids = httpx.post(f"{server}/v1/loglikelihood", timeout=60, json={
        **body, "prompt": ids, "continuations": [tok(c, add_special_tokens=False)["input_ids"] for c in conts]}).json()
    assert [d["loglikelihood"] for d in by_ids["data"]] == [d["loglikelihood"] for d in data]
    for bad, param in [({"continuations": []}, "continuations"), ({"continuations": [""]}, "continuations"),
                       ({"mc_samples": 0}, "mc_samples"), ({"continuations": [[10**7]]}, "continuations"),
                       ({"prompt": "x" * 255}, "continuations")]:
        r = httpx.post(f"{server}/v1/loglikelihood", json={**body, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


def test_guided_choice_answers_with_the_choice_the_model_finds_most_likely(server, client):
    """vLLM's guided_choice: the answer is the choice of the highest ELBO estimate (what /v1/loglikelihood
    reports for the same prompt and seed), the same streamed or not, for chat too; n samples share it."""
    prompt, choices = "sort: dcba =>", [" dcba", " abcd", " x"]
    scores = httpx.post(f"{server}/v1/loglikelihood", timeout=60, json={
        "model": "tiny", "prompt": prompt, "continuations": choices, "seed": 3}).json()["data"]
    best = choices[max(range(3), key=lambda k: scores[k]["loglikelihood"])]
    guided = {"guided_choice": choices}
    out = client.completions.create(model="tiny", prompt=prompt, n=2, seed=3, extra_body=guided)
    assert [c.text for c in out.choices] == [best, best] and {c.finish_reason for c in out.choices} == {"stop"}
    assert out.usage.completion_tokens == 2 * len(best)  # char tokenizer: a token per character
    assert out.model_extra["dllm"]["forwards"] == 3 * 2  # 64 masked copies of each choice, 32 per forward
    chunks = list(client.completions.create(model="tiny", prompt=prompt, seed=3, extra_body=guided, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == best
    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model="tiny", messages=messages, seed=3, extra_body=guided)
    assert chat.choices[0].message.content in choices
    for bad in [{"logprobs": 1}, {"guided_choice": [""]}, {"guided_choice": []}]:
        r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": prompt, **guided, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "guided_choice", (bad, r.text)


# A template that shows the model the tools' names (as tool-calling checkpoints' templates show their definitions)
TOOLS_TEMPLATE = ("{% if tools %}tools: {% for t in tools %}{{ t.function.name }} {% endfor %}{% endif %}"
                  "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture(scope="module")
def json_app(server, tmp_path_factory, json_tokenizer):
    """An app whose vocabulary can write JSON, and whose default decoder is not JSON mode's (a JSON request gets the
    threshold rule without asking): (its base URL, its model)."""
    from ray import serve

    from conftest import make_config
    from serve.app import build_app

    path = tmp_path_factory.mktemp("json") / "tiny"
    model = dllm.build_model(make_config(json_tokenizer), seed=0)
    dllm.save_pretrained(model, json_tokenizer, path)
    serve.run(build_app({"model": str(path), **APP_ARGS, "decoding": {**APP_ARGS["decoding"], "decoder": "hierarchical"},
                         "chat_template": TOOLS_TEMPLATE}), name="json", route_prefix="/json")
    yield f"{server}/json", model
    serve.delete("json")


def test_response_format_answers_with_a_json_object_as_the_engine_does(server, json_app, json_tokenizer):
    """JSON mode: the engine's answer, on both endpoints, streamed or not; an answer held to a json_schema; schemas
    with keywords answers would not be held to are refused by name."""
    from dllm.engine.json_mode import JsonPrefix

    url, model = json_app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S)
    fmt = {"type": "json_object"}
    closing = json_tokenizer.convert_tokens_to_ids("}")
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "an object"}],
                                          response_format=fmt, logit_bias={str(closing): 100}, max_tokens=16)
    assert chat.choices[0].message.content.strip() == "{}" and chat.choices[0].finish_reason == "stop"
    engine = dllm.Engine(model, json_tokenizer, max_model_len=256)
    cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=24, early_stop=True, response_format="json_object",
                                temperature=1.0, seed=4)
    direct = engine.generate(["x"], cfg)[0]
    body = dict(model="tiny", prompt="x", max_tokens=24, temperature=1.0, seed=4, extra_body={"response_format": fmt})
    out = client.completions.create(**body)
    chunks = list(client.completions.create(**body, stream=True))
    assert out.choices[0].text == "".join(c.choices[0].text for c in chunks if c.choices) == direct.text
    assert JsonPrefix().feed(direct.text.encode()) is not None
    held = client.chat.completions.create(  # 4 gaps of at most 16 whitespace bytes around 11 characters
        model="tiny", messages=[{"role": "user", "content": "ok?"}], max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": FLAG_SCHEMA}})
    assert held.choices[0].finish_reason == "stop" and set(json.loads(held.choices[0].message.content)) == {"ok"}
    for bad, param in [({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
                       ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                           "type": "object", "properties": {"a": {"type": "string", "pattern": "^a"}}}}}},
                        "response_format"),
                       ({"response_format": {"type": "yaml"}}, "response_format"),
                       ({"response_format": {}}, "response_format"),  # OpenAI's type is required
                       ({"response_format": fmt, "guided_choice": ["{}"]}, "guided_choice"),
                       ({"response_format": fmt, "decoder": "credit"}, "decoder"),
                       ({"response_format": fmt, "min_tokens": 2}, "min_tokens")]:
        r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "response_format": {"json": 1}})
    assert r.json()["error"]["message"].startswith('response_format must be {"type": "text" | "json_object"} or') \
        and r.json()["error"]["message"].endswith("got type None"), r.text
    # The main app's vocabulary has no '{': the request is refused with why.
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                          "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and "starts a JSON object" in r.json()["error"]["message"], r.text


def test_vllms_structured_outputs_and_guided_json_name_the_same_answers(server, json_app):
    """vLLM's structured_outputs ({"json"}, {"json_object"}, {"choice"}; vLLM >= 0.12) and guided_json (older) are
    response_format json_schema / json_object and guided_choice by other names; what we would not hold answers to is
    a 400 that names it."""
    url, _ = json_app
    body = {"model": "tiny", "messages": [{"role": "user", "content": "ok?"}], "max_tokens": 80}

    def content(extra: dict) -> str:
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, **extra}, timeout=CLIENT_TIMEOUT_S)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    held = content({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": FLAG_SCHEMA}}})
    assert content({"structured_outputs": {"json": FLAG_SCHEMA}}) == held
    assert content({"guided_json": json.dumps(FLAG_SCHEMA)}) == held  # a schema's JSON text too
    assert content({"structured_outputs": {"json_object": True}}) == content({"response_format": {"type": "json_object"}})
    prompt, choices = "sort: dcba =>", [" dcba", " abcd", " x"]
    guided = [httpx.post(f"{server}/v1/completions", timeout=60, json={"model": "tiny", "prompt": prompt, "seed": 3,
                                                                       **extra}).json()["choices"][0]["text"]
              for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}})]
    assert guided[0] == guided[1] in choices
    for bad, param in [({"structured_outputs": {"regex": "a+"}}, "structured_outputs"),
                       ({"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
                       ({"structured_outputs": {"choice": "a"}}, "structured_outputs"),
                       ({"structured_outputs": {"json": FLAG_SCHEMA}, "guided_choice": ["a"]}, "structured_outputs"),
                       ({"guided_json": FLAG_SCHEMA, "response_format": {"type": "json_object"}}, "guided_json"),
                       ({"structured_outputs": {"json": {"type": "object", "properties": {"a": {"format": "date"}}}}},
                        "structured_outputs")]:
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


FLAG_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
TOOLS = [{"type": "function", "function": {"name": "flag", "description": "Set the flag.", "parameters": FLAG_SCHEMA}},
         {"type": "function", "function": {"name": "ping"}}]  # no parameters: called with {}


def test_a_call_of_one_of_several_functions_is_taken_apart_as_it_streams():
    """tool_choice "required" with several tools: {"<name>": <arguments>} gives the name once it is written and the
    arguments in pieces, each a prefix of the finished answer's (a trailing '}' may close the wrapper)."""
    from serve.tools import CallStream, ForcedCall

    call = ForcedCall(("flag", "ping"), {})
    text = '{ "flag" :\n{"ok": {"x": {}}} \n}'
    final = call.split(text, finished=True)
    assert final == ("flag", '{"ok": {"x": {}}}')
    for cut in range(len(text)):
        name, arguments = call.split(text[:cut], finished=False)
        assert (name is None) == (cut < text.index(":") + 1) and final[1].startswith(arguments)
    stream = CallStream(call)
    pieces = [stream.feed(text[i:i + 3], False) for i in range(0, len(text), 3)] + [stream.feed("", True)]
    assert "".join(pieces) == final[1] and stream.name == "flag"
    assert call.split('{"pong": {}}', finished=True) == (None, "")  # not one of the functions
    assert ForcedCall(("ping",), {}).split('{"a"', finished=False) == ("ping", '{"a"')  # one function: its arguments


def test_a_forced_tool_call_answers_with_the_functions_arguments_held_to_its_parameters(json_app):
    """tool_choice naming a function: the answer is one call of it, its arguments the JSON a json_schema
    response_format with the function's parameters answers, streamed as OpenAI streams a call; "required": a call of
    one of the tools, the model writing which; "none" answers in text; what cannot be held to is refused by name."""
    url, _ = json_app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S)
    messages = [{"role": "user", "content": "ok?"}]
    kw = dict(model="tiny", messages=messages, max_tokens=80)
    held = client.chat.completions.create(  # the same prompt (tools shown), answered by a json_schema
        **kw, tools=TOOLS, tool_choice="none",
        response_format={"type": "json_schema", "json_schema": {"name": "flag", "schema": FLAG_SCHEMA}})
    named = client.chat.completions.create(**kw, tools=TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "flag"}})
    shown = httpx.post(f"{url}/tokenize", json={"model": "tiny", "messages": messages, "tools": TOOLS}).json()
    plain = httpx.post(f"{url}/tokenize", json={"model": "tiny", "messages": messages}).json()
    assert named.usage.prompt_tokens == shown["count"] == plain["count"] + len("tools: flag ping ")
    message = named.choices[0].message
    assert message.content is None and len(message.tool_calls) == 1 and named.choices[0].finish_reason == "stop"
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "flag" and call.id.startswith("call_")
    assert call.function.arguments == held.choices[0].message.content and set(json.loads(call.function.arguments)) == {"ok"}
    required = client.chat.completions.create(**kw, tools=TOOLS[:1], tool_choice="required")
    assert required.choices[0].message.tool_calls[0].function.name == "flag"
    wide = {**kw, "max_tokens": 200}  # 8 gaps of up to 16 whitespace bytes around the wrapper's 24 characters
    either = client.chat.completions.create(**wide, tools=TOOLS, tool_choice="required")  # the model picks which
    assert either.choices[0].finish_reason == "stop"
    picked = either.choices[0].message.tool_calls[0].function
    assert picked.name in ("flag", "ping") and set(json.loads(picked.arguments)) == {"flag": {"ok"}, "ping": set()}[
        picked.name]
    streamed = [d for c in client.chat.completions.create(**wide, tools=TOOLS, tool_choice="required", stream=True)
                if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert streamed[0].function.name == picked.name and "".join(d.function.arguments or "" for d in streamed) == \
        picked.arguments
    ping = client.chat.completions.create(**kw, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "ping"}})
    assert json.loads(ping.choices[0].message.tool_calls[0].function.arguments) == {}
    chunks = list(client.chat.completions.create(**kw, tools=TOOLS, stream=True,
                                                 tool_choice={"type": "function", "function": {"name": "flag"}}))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "flag"
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "stop"
    text = client.chat.completions.create(**kw, tools=TOOLS, tool_choice="none").choices[0].message
    assert text.tool_calls is None and isinstance(text.content, str)
    history = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                          {"role": "tool", "tool_call_id": call.id, "content": "done"}]  # the call's result, answered
    assert client.chat.completions.create(model="tiny", messages=history, max_tokens=8, tools=TOOLS,
                                          tool_choice="none").choices[0].message.content is not None
    weird = {"type": "object", "properties": {"a": {"type": "string", "minLength": 2}}}
    for bad, param in [({"tools": TOOLS}, "tool_choice"),  # OpenAI's default with tools is "auto": no parser here
                       ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice"),
                       ({"tools": [{"type": "function", "function": {"name": f, "parameters": {
                           "type": "object", "properties": {"x": {"$ref": "#/$defs/X"}},
                           "$defs": {"X": {"type": kind}}}}} for f, kind in (("f", "string"), ("g", "boolean"))],
                         "tool_choice": "required"}, "tool_choice"),  # $defs/X twice, differently: one schema holds both
                       ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
                       ({"tool_choice": "required"}, "tool_choice"),
                       ({"tools": [{"type": "code_interpreter"}], "tool_choice": "none"}, "tools"),
                       ({"tools": [{"type": "function", "function": {"name": "w", "parameters": weird}}],
                         "tool_choice": "required"}, "tools"),
                       ({"tools": TOOLS[:1], "tool_choice": "required", "response_format": {"type": "json_object"}},
                        "response_format"),
                       ({"tools": TOOLS[:1], "tool_choice": "required", "decoder": "credit"}, "decoder")]:
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": messages, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": None}]})
    assert r.status_code == 400 and "only an assistant message with tool_calls" in r.json()["error"]["message"]
    for bad in [{"prompt": "x", "tools": TOOLS}, {"messages": messages, "tools": [{"type": "retrieval"}]}]:
        r = httpx.post(f"{url}/tokenize", json={"model": "tiny", **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools", r.text


def test_calls_the_model_writes_are_parsed_out_of_its_text_however_it_streams():
    """tool_choice "auto" under the hermes parser: a <tool_call> block whose JSON calls a given function is a call,
    any other block stays in the text as written, whitespace around a call is dropped; fed in pieces of any size,
    the stream gives out what the whole answer parses to."""
    from serve.tools import TOOL_CALL_PARSERS, ParsedCalls, ParsedCallStream

    calls = ParsedCalls(("get", "set"), *TOOL_CALL_PARSERS["hermes"])
    get = '<tool_call>\n{"name": "get", "arguments": {"q": "é"}}\n</tool_call>'
    cases = {
        f"sure. {get}\n<tool_call>{{\"name\": \"set\", \"arguments\": \"{{\\\"a\\\": 1}}\"}}</tool_call> \n":
            ("sure.", [("get", '{"q": "é"}'), ("set", '{"a": 1}')]),  # arguments as an object or its JSON text
        "no call < <tool here \n": ("no call < <tool here \n", []),  # no block: the text as it is
        get: (None, [("get", '{"q": "é"}')]),  # only calls: no content
        '<tool_call>{"name": "get"}': (None, [("get", "{}")]),  # ended unclosed, its JSON whole; no arguments: {}
        '<tool_call>{"name": "get", "argu': ('<tool_call>{"name": "get", "argu', []),  # cut inside the JSON
        f'a <tool_call>{{"name": "rm", "arguments": {{}}}}</tool_call> {get}  b':  # not a given function: text
            ('a <tool_call>{"name": "rm", "arguments": {}}</tool_call>b', [("get", '{"q": "é"}')]),
        '<tool_call>{"name": "get", "arguments": [1]}</tool_call>': ('<tool_call>{"name": "get", "arguments": [1]}'
                                                                     '</tool_call>', []),  # arguments not an object
        '<tool_call>{"name": "get", "id": 3}</tool_call>': ('<tool_call>{"name": "get", "id": 3}</tool_call>', []),
    }
    for text, expected in cases.items():
        assert calls.parse(text) == expected, text
        for size in (1, 2, 3, 7, 13):
            stream, content, got = ParsedCallStream(calls), "", []
            pieces = [text[i:i + size] for i in range(0, len(text), size)]
            for k, piece in enumerate(pieces):
                new_text, new_calls = stream.feed(piece, finished=k == len(pieces) - 1)
                content, got = content + new_text, got + new_calls
            assert (content or None, got) == (expected[0] or None, expected[1]), (text, size)
    stream = ParsedCallStream(calls)  # what may open a block is held back: text given out is final
    assert stream.feed("ok \n<tool_", False) == ("ok", []) and stream.feed("call>{", False) == ("", [])
    assert stream.feed('"name": "get"}</tool_call>  ', False) == ("", [("get", "{}")])
    assert stream.feed("bye", True) == ("bye", [])


def _memorized(tokenizer, answers: dict[str, str], block_size: int, steps: int = 800):
    """A tiny model trained (plain masked diffusion, one block of `block_size` after each prompt) until it writes each
    answer for its prompt: a model that writes tool calls in the hermes format where its prompt shows tools."""
    from conftest import make_config

    cfg = make_config(tokenizer)
    model = dllm.build_model(cfg, seed=0)
    rows = []
    for prompt, answer in answers.items():
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert len(a) < block_size
        rows.append((torch.tensor([p + a + [cfg.eos_token_id] * (block_size - len(a))]).repeat(8, 1), len(p)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    head = model.model.transformer["ff_out"]
    for step in range(steps):
        row, prompt_len = rows[step % len(rows)]
        prompt_mask = torch.zeros_like(row, dtype=torch.bool)
        prompt_mask[:, :prompt_len] = True
        noised = dllm.noise_batch(row, prompt_mask, None, mask_token_id=cfg.mask_token_id,
                                  terminal_token_ids=(cfg.eos_token_id,), t_min=0.05, t_max=1.0, generator=gen)
        loss = dllm.diffusion_loss_from_hidden(model(noised.input_ids, return_hidden=True), head, noised.targets,
                                               noised.loss_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _hermes(city: str) -> str:
    return f'<tool_call>\n{{"name": "w", "arguments": {{"c": "{city}"}}}}\n</tool_call>'


WEATHER = [{"type": "function", "function": {"name": "w", "parameters": {
    "type": "object", "properties": {"c": {"type": "string"}}, "required": ["c"]}}}]
TOOL_ANSWERS = {("rain in paris?", True): "sure.\n" + _hermes("p"),
                ("paris and rome?", True): _hermes("p") + "\n" + _hermes("r"),
                ("hi", False): "hello there"}


@pytest.fixture(scope="module")
def tool_app(server, tmp_path_factory):
    """An app with the hermes tool-call parser, serving a model trained to call the function w in that format:
    (its base URL, the engine's answer to each TOOL_ANSWERS prompt)."""
    from ray import serve

    from serve.app import build_app

    texts = [TOOLS_TEMPLATE, *(q for q, _ in TOOL_ANSWERS), *TOOL_ANSWERS.values(), "tools: w user assistant"]
    tok = dllm.train_tokenizer(texts, kind="char")
    tok.chat_template = TOOLS_TEMPLATE
    prompts = {key: tok.apply_chat_template([{"role": "user", "content": key[0]}], tools=WEATHER if key[1] else None,
                                            tokenize=False, add_generation_prompt=True) for key in TOOL_ANSWERS}
    model = _memorized(tok, {prompts[key]: answer for key, answer in TOOL_ANSWERS.items()}, block_size=128)
    engine = dllm.Engine(model, tok, max_model_len=256)
    cfg = dllm.GenerationConfig(block_size=128, max_new_tokens=128)
    answers = {key: engine.generate([prompt], cfg)[0].text for key, prompt in prompts.items()}
    path = tmp_path_factory.mktemp("tools") / "tiny"
    dllm.save_pretrained(model, tok, path)
    serve.run(build_app({"model": str(path), **APP_ARGS, "max_block_size": 128, "chat_template": TOOLS_TEMPLATE,
                         "decoding": {"block_size": 128, "max_tokens": 128}, "tool_call_parser": "hermes"}),
              name="tools", route_prefix="/tools")
    yield f"{server}/tools", answers
    serve.delete("tools")


def test_tool_choice_auto_takes_the_calls_the_model_writes_out_of_its_answer(tool_app):
    """With tools and no tool_choice (OpenAI's "auto") the model decides: a trained model's <tool_call> blocks become
    message.tool_calls (finish_reason "tool_calls"), the text around them the content, streamed as OpenAI streams
    calls; parallel_tool_calls false ends the answer after its first call; an answer without calls is text."""
    url, answers = tool_app
    assert answers == TOOL_ANSWERS, "the tiny model did not learn its answers; the test below needs them"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S)

    def ask(question: str, **kw):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}], **kw)

    one = ask("rain in paris?", tools=WEATHER).choices[0]
    assert one.finish_reason == "tool_calls" and one.message.content == "sure."
    [call] = one.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == ("w", {"c": "p"})
    two = ask("paris and rome?", tools=WEATHER, tool_choice="auto")
    message = two.choices[0].message
    assert message.content is None and [json.loads(c.function.arguments)["c"] for c in message.tool_calls] == ["p", "r"]
    chunks = list(ask("paris and rome?", tools=WEATHER, stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == \
        [(k, "w", c.function.arguments) for k, c in enumerate(message.tool_calls)]
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    first = ask("paris and rome?", tools=WEATHER, parallel_tool_calls=False)
    assert [json.loads(c.function.arguments) for c in first.choices[0].message.tool_calls] == [{"c": "p"}]
    assert first.choices[0].finish_reason == "tool_calls"
    assert first.usage.completion_tokens < two.usage.completion_tokens  # it stopped after the first call
    patterned = [{"type": "function", "function": {"name": "w", "parameters": {  # "pattern" could not be held to:
        "type": "object", "properties": {"c": {"type": "string", "pattern": "^[a-z]+$"}}}}}]  # parsed calls need not
    assert ask("rain in paris?", tools=patterned).choices[0].message.tool_calls[0].function.arguments == call.function.arguments
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny", "tools": patterned, "tool_choice": "required",
                                                        "messages": [{"role": "user", "content": "rain in paris?"}]})
    assert r.status_code == 400 and "tools[0].function.parameters" in r.json()["error"]["message"]  # forced ones do
    text = ask("rain in paris?", tools=WEATHER, tool_choice="none").choices[0]  # no parsing: the text as written
    assert text.message.tool_calls is None and text.message.content == TOOL_ANSWERS["rain in paris?", True]
    assert text.finish_reason == "stop"
    plain = ask("hi").choices[0]
    assert plain.message.content == "hello there" and plain.finish_reason == "stop"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "rain in paris?"}], "tools": WEATHER}
    for bad, param in [({"response_format": {"type": "json_object"}}, "response_format"),
                       ({"guided_choice": ["a", "b"]}, "guided_choice"),
                       ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                         "echo": True, "add_generation_prompt": False, "continue_final_message": True}, "echo")]:
        r = httpx.post(f"{url}/v1/chat/completions", json={**body, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)


def test_ignore_eos_and_min_tokens_are_the_engines(client, model_dir):
    engine = dllm.Engine(dllm.load_model(model_dir), dllm.load_tokenizer(model_dir), max_model_len=256)
    cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=40, early_stop=True, stops_last=True)
    prompt = "spell 7 =>"  # 17 tokens, then EOS
    for extra, changes in [({"ignore_eos": True}, {"ignore_eos": True}), ({"min_tokens": 20}, {"min_tokens": 20})]:
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, extra_body=extra)
        direct = engine.generate([prompt], cfg.replace(**changes))[0]
        assert out.choices[0].text == direct.text and out.usage.completion_tokens == len(direct.token_ids)
        assert out.choices[0].finish_reason == direct.finish_reason
        assert len(direct.token_ids) == 40 if "ignore_eos" in extra else len(direct.token_ids) >= 20
    assert len(engine.generate([prompt], cfg)[0].token_ids) < 20  # without them the answer is shorter


def test_sampling_filters_logit_bias_and_penalties_are_the_engines(client, model_dir):
    tok = dllm.load_tokenizer(model_dir)
    engine = dllm.Engine(dllm.load_model(model_dir), tok, max_model_len=256)
    cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=40, early_stop=True, stops_last=True)
    prompt = "reverse: abcd =>"
    v_id = tok("v", add_special_tokens=False)["input_ids"][0]
    assert "v" in engine.generate([prompt], cfg)[0].text
    sampled = dict(temperature=1.5, seed=3, top_p=0.9)
    for extra, changes in [({}, {}), ({"top_k": 4, "min_p": 0.05}, {"top_k": 4, "min_p": 0.05}),
                           ({"top_k": -1}, {})]:  # vLLM's "every token"
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, **sampled, extra_body=extra)
        direct = engine.generate([prompt], cfg.replace(**sampled, **changes))[0]
        assert out.choices[0].text == direct.text
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, logit_bias={str(v_id): -100})
    direct = engine.generate([prompt], cfg.replace(logit_bias={v_id: -100.0}))[0]
    assert out.choices[0].text == direct.text and "v" not in direct.text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=40,
                                          logit_bias={str(v_id): -100})
    assert "v" not in chat.choices[0].message.content
    penalties = {"presence_penalty": 1.0, "frequency_penalty": 2.0}
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, **penalties,
                                    extra_body={"repetition_penalty": 1.5})
    direct = engine.generate([prompt], cfg.replace(**penalties, repetition_penalty=1.5))[0]
    assert out.choices[0].text == direct.text != engine.generate([prompt], cfg)[0].text


def test_vllms_stop_string_special_token_and_allowed_token_options_are_the_engines(client, server, model_dir):
    tok = dllm.load_tokenizer(model_dir)
    engine = dllm.Engine(dllm.load_model(model_dir), tok, max_model_len=256)
    cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=40, early_stop=True, stops_last=True)
    prompt, eos = "reverse: abcd =>", engine.config.eos_token_id
    full = engine.generate([prompt], cfg)[0]
    stop = full.text[2:4]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, stop=[stop],
                                    extra_body={"include_stop_str_in_output": True}).choices[0]
    assert out.text == full.text[:full.text.find(stop) + len(stop)] and out.finish_reason == "stop"
    # skip_special_tokens: false writes the EOS tokens an ignore_eos answer holds
    spelled = {"ignore_eos": True, "skip_special_tokens": False}
    out = client.completions.create(model="tiny", prompt="spell 7 =>", max_tokens=40, extra_body=spelled).choices[0]
    direct = engine.generate(["spell 7 =>"], cfg.replace(**spelled))[0]
    assert out.text == direct.text and tok.convert_ids_to_tokens(eos) in out.text
    # allowed_token_ids: the engine's answer, of those tokens only
    allowed = sorted(set(full.token_ids))[::2] + [eos]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=40,
                                    extra_body={"allowed_token_ids": allowed}).choices[0]
    direct = engine.generate([prompt], cfg.replace(allowed_token_ids=allowed))[0]
    assert out.text == direct.text != full.text and set(direct.token_ids) <= set(allowed)
    for bad, param in [({"allowed_token_ids": [engine.mask_id]}, "allowed_token_ids"),
                       ({"allowed_token_ids": allowed, "response_format": {"type": "json_object"}},
                        "allowed_token_ids")]:
        r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": prompt, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(client, model_dir):
    tok = dllm.load_tokenizer(model_dir)
    engine = dllm.Engine(dllm.load_model(model_dir), tok, max_model_len=256)
    cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=40, early_stop=True, stops_last=True)
    prompt = "reverse: abcd =>"
    kept = len(tok(prompt, add_special_tokens=False)["input_ids"])
    out = client.completions.create(model="tiny", prompt="sort: dcba => abcd\n" + prompt, max_tokens=40, echo=True,
                                    extra_body={"truncate_prompt_tokens": kept})
    assert out.choices[0].text == prompt + engine.generate([prompt], cfg)[0].text  # the echo is what the model read
    assert out.usage.prompt_tokens == kept
    # -1: as many as leave room for one block of the app's 8 in its context of 256
    long = client.completions.create(model="tiny", prompt="a" * 300, max_tokens=8,
                                     extra_body={"truncate_prompt_tokens": -1})
    assert long.usage.prompt_tokens == 256 - 8
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=8,
                                          extra_body={"truncate_prompt_tokens": 5})
    assert chat.usage.prompt_tokens == 5


def test_continuous_usage_stats_put_each_choices_usage_so_far_in_every_chunk(server, client):
    kw = {"model": "tiny", "prompt": "reverse: abcd =>", "max_tokens": 40, "temperature": 1.0, "seed": 4, "n": 2}
    full = client.completions.create(**kw)
    body = {**kw, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    *chunks, total = events
    so_far: dict[int, list[int]] = {0: [], 1: []}
    for c in chunks:
        assert c["usage"]["prompt_tokens"] == len("reverse: abcd =>")
        assert c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"]
        so_far[c["choices"][0]["index"]].append(c["usage"]["completion_tokens"])
    for counts in so_far.values():
        assert counts == sorted(counts) and len(set(counts)) > 1  # they grow as blocks arrive
    assert sum(counts[-1] for counts in so_far.values()) == total["usage"]["completion_tokens"] \
        == full.usage.completion_tokens


def test_tokenize_and_detokenize(server, model_dir):
    tok = dllm.load_tokenizer(model_dir)
    r = httpx.post(f"{server}/tokenize", json={"model": "tiny", "prompt": "sort: ba =>"}).json()
    assert r["tokens"] == tok("sort: ba =>", add_special_tokens=False)["input_ids"]
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(f"{server}/tokenize", json={"model": "tiny", "messages": msgs}).json()
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert r["tokens"] == tok(text, add_special_tokens=False)["input_ids"]
    back = httpx.post(f"{server}/detokenize", json={"model": "tiny", "tokens": r["tokens"]}).json()
    assert back == {"prompt": tok.decode(r["tokens"])}
    for route, body, param in [("tokenize", {"model": "tiny"}, "prompt"),
                               ("tokenize", {"model": "tiny", "prompt": "x", "messages": msgs}, "prompt"),
                               ("detokenize", {"model": "tiny", "tokens": [10**7]}, "tokens"),
                               ("detokenize", {"model": "tiny", "tokens": "abc"}, "tokens"),
                               ("tokenize", {"model": "nope", "prompt": "x"}, "model")]:
        r = httpx.post(f"{server}/{route}", json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param


def test_chat_text_parts_and_a_continued_final_message(server, client, model_dir):
    """OpenAI's content parts read as their texts joined by newlines (as vLLM joins them); with
    continue_final_message (and no generation prompt) the answer continues the client's assistant
    message: the prompt is the generation prompt + that text, and the answer is the engine's for it."""
    tok = dllm.load_tokenizer(model_dir)

    def tokens(body):
        return httpx.post(f"{server}/tokenize", json={"model": "tiny", **body}).json()["tokens"]

    parts = [{"role": "user", "content": [{"type": "text", "text": "sort:"}, {"type": "text", "text": "dcba =>"}]}]
    joined = [{"role": "user", "content": "sort:\ndcba =>"}]
    assert tokens({"messages": parts}) == tokens({"messages": joined})
    answers = [client.chat.completions.create(model="tiny", messages=m, max_tokens=24).choices[0].message.content
               for m in (parts, joined)]
    assert answers[0] == answers[1]

    user = [{"role": "user", "content": "sort: dcba =>"}]
    started = user + [{"role": "assistant", "content": "ab"}]
    opened = tok(tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True) + "ab",
                 add_special_tokens=False)["input_ids"]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    assert tokens({"messages": started, **options}) == opened
    out = client.chat.completions.create(model="tiny", messages=started, max_tokens=40, extra_body=options)
    engine = dllm.Engine(dllm.load_model(model_dir), tok, max_model_len=256)
    cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=40, early_stop=True, stops_last=True)
    direct = engine.generate([opened], cfg)[0]
    assert out.choices[0].message.content == direct.text
    assert out.usage.prompt_tokens == len(opened)
    echo = {**options, "echo": True}  # the answer as a whole: the client's start, then the engine's text
    out = client.chat.completions.create(model="tiny", messages=started, max_tokens=40, extra_body=echo)
    assert out.choices[0].message.content == "ab" + direct.text
    chunks = list(client.chat.completions.create(model="tiny", messages=started, max_tokens=40, extra_body=echo,
                                                 stream=True))
    assert chunks[0].choices[0].delta.content == "ab"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ab" + direct.text


def test_an_operators_chat_template_replaces_the_checkpoints(server, endless_dir):
    """The "endless" app serves SYSTEM_FIRST_TEMPLATE (given as a file when the app was built): chat prompts are
    its rendering, and the exception the template raises is the client's 400, not a server error."""
    tok = dllm.load_tokenizer(endless_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort: cba =>"}]
    r = httpx.post(f"{server}/endless/tokenize", json={"model": "tiny", "messages": messages})
    assert r.json()["tokens"] == tok("<system>be brief<user>sort: cba =><assistant>",
                                     add_special_tokens=False)["input_ids"]
    chat = httpx.post(f"{server}/endless/v1/chat/completions", timeout=CLIENT_TIMEOUT_S,
                      json={"model": "tiny", "messages": messages, "max_tokens": 4, "block_size": 4})
    assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == len(r.json()["tokens"])
    refused = httpx.post(f"{server}/endless/v1/chat/completions", timeout=CLIENT_TIMEOUT_S,
                         json={"model": "tiny", "messages": messages[1:], "max_tokens": 4})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "messages"
    assert "a system message must come first" in refused.json()["error"]["message"]


def test_sse_wire_format_ends_with_done_and_can_report_usage(server):
    with httpx.stream("POST", f"{server}/v1/completions", json={
            "model": "tiny", "prompt": "add 1+2 =>", "stream": True, "max_tokens": 24,
            "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["prompt_tokens"] == len("add 1+2 =>")


def test_concurrent_requests_each_get_their_own_answer(server, client):
    prompts = [f"reverse: {w} =>" for w in ("a", "ab", "abc", "abcd", "dcba", "cab", "bca", "aabb", "x", "xy", "yx", "abab")]
    alone = {p: client.completions.create(model="tiny", prompt=p, max_tokens=40).choices[0].text for p in prompts}
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        together = dict(zip(prompts, pool.map(
            lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=40).choices[0].text, prompts)))
    assert together == alone
    assert all(alone.values()) and len(set(alone.values())) > 1


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "tiny", "prompt": 3}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x" * 300}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "n": 65}, 400, "n"),
    ({"model": "tiny", "prompt": ["x"] * 9, "n": 8}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "n": 2, "best_of": 3}, 400, "best_of"),
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ({"model": "tiny", "prompt": ["x", ""]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "decoder": "beam"}, 400, "decoder"),
    ({"model": "tiny", "prompt": "x", "cache_policy": "paged"}, 400, "cache_policy"),
    ({"model": "tiny", "prompt": "x", "stops_last": "sometimes"}, 400, "stops_last"),
    ({"model": "tiny", "prompt": "x", "unknown_field": 1}, 400, "unknown_field"),
    ({"model": "tiny", "prompt": [10**7]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ({"model": "tiny", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "x", "min_tokens": -1}, 400, "min_tokens"),
    ({"model": "tiny", "prompt": "x", "min_tokens": 9, "max_tokens": 8}, 400, "min_tokens"),
    ({"model": "tiny", "prompt": "x", "logprobs": 1, "echo": True}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "top_k": -2}, 400, "top_k"),
    ({"model": "tiny", "prompt": "x", "min_p": 1.5}, 400, "min_p"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"10000000": 1}}, 400, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"model": "tiny", "prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ({"model": "tiny", "prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ({"model": "tiny", "prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"model": "tiny", "prompt": "x", "allowed_token_ids": []}, 400, "allowed_token_ids"),
    ({"model": "tiny", "prompt": "x", "allowed_token_ids": [10**7]}, 400, "allowed_token_ids"),
    ({"model": "tiny", "prompt": "x", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
    ({"model": "tiny", "prompt": "x", "truncate_prompt_tokens": -2}, 400, "truncate_prompt_tokens"),
    ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "tiny", "prompt": "x", "stream": True, "stream_options": {"usage": True}}, 400, "stream_options"),
])
def test_invalid_completion_requests_get_openai_style_errors(server, body, status, param):
    r = httpx.post(f"{server}/v1/completions", json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_the_context_check_uses_the_replicas_block_size(server, model_dir):
    """The app decodes blocks of 8 (APP_ARGS) in a 256-token context: a 248-token prompt fits, one more does not,
    and a request's own block size replaces the app's."""
    a = dllm.load_tokenizer(model_dir)("a", add_special_tokens=False)["input_ids"]
    fits = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": a * 248, "max_tokens": 8},
                      timeout=60)
    assert fits.status_code == 200, fits.text
    for n, extra, block in ((249, {}, 8), (241, {"block_size": 16}, 16)):
        r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": a * n, "max_tokens": 8, **extra})
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded", r.text
        assert f"has {n} tokens; with one block of {block} it exceeds the model's context of 256" in err["message"]


def test_invalid_chat_requests_and_bad_json(server):
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    msgs = [{"role": "user", "content": "x"}]
    for body, param in [({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")]:
        r = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny", "messages": msgs, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    continued = {"continue_final_message": True, "add_generation_prompt": False}
    for messages, body, param in [
            ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {}, "messages"),
            ([{"role": "user", "content": [{"type": "text"}]}], {}, "messages"),
            (msgs + [{"role": "assistant", "content": "a"}], {"continue_final_message": True}, "continue_final_message"),
            (msgs + [{"role": "assistant", "content": " "}], continued, "continue_final_message"),
            (msgs + [{"role": "assistant", "content": "a"}], {**continued, "echo": True, "logprobs": True},
             "logprobs")]:
        r = httpx.post(f"{server}/v1/chat/completions", json={"model": "tiny", "messages": messages, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(f"{server}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(f"{server}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def _assert_aborted_and_freed(before: int, n: int) -> None:
    """The endless app aborted n more requests (from `before`) and holds no running request, slot or page."""
    deadline = time.time() + 20
    while time.time() < deadline:
        info = _engine_info("endless")
        if info["aborted"] >= before + n and info["running"] == 0:
            break
        time.sleep(0.2)
    assert info["aborted"] == before + n
    assert info["running"] == 0 and info["cache_slots_used"] == 0 and info["cache_pages_used"] == 0


@pytest.mark.parametrize("n", [1, 3])
def test_a_client_that_disconnects_mid_stream_aborts_its_requests(server, n):
    before = _engine_info("endless")["aborted"]
    with httpx.stream("POST", f"{server}/endless/v1/completions", json={
            "model": "tiny", "prompt": [5, 6, 7, 8, 9], "stream": True, "max_tokens": 1024, "block_size": 1,
            "threshold": 1.0, "n": n}) as r:
        next(r.iter_lines())  # the first block arrived; now hang up
    _assert_aborted_and_freed(before, n)


@pytest.mark.parametrize("n", [1, 3])
def test_a_client_that_hangs_up_before_a_whole_answer_aborts_its_requests(server, n):
    """Not streamed: Serve cancels the request's handler when its client goes, and the answers it waited for are
    aborted (their slots and pages freed), not decoded to their end for nobody."""
    before = _engine_info("endless")["aborted"]
    body = json.dumps({"model": "tiny", "prompt": [5, 6, 7, 8, 9], "max_tokens": 1024, "block_size": 1,
                       "threshold": 1.0, "n": n}).encode()
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:  # a client that can hang up when it likes
        conn.sendall(b"POST /endless/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.time() + 20
        while _engine_info("endless")["running"] < n and time.time() < deadline:
            time.sleep(0.05)
        assert _engine_info("endless")["running"] == n  # decoding (251 one-token blocks each): now hang up
    _assert_aborted_and_freed(before, n)


def test_api_keys_are_enforced_except_on_health(server):
    base = f"{server}/secure"
    assert httpx.get(f"{base}/health").status_code == 200
    r = httpx.get(f"{base}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
    secure = openai.OpenAI(base_url=f"{base}/v1", api_key="k1", max_retries=0, timeout=CLIENT_TIMEOUT_S)
    assert secure.completions.create(model="tiny", prompt="x", max_tokens=8).choices[0].finish_reason


def test_an_apps_max_prefill_tokens_reach_its_replicas_engine(server):
    assert (_engine_info("secure")["max_prefill_tokens"], _engine_info()["max_prefill_tokens"]) == (64, 8192)


def test_priority_is_a_request_field_of_apps_that_schedule_by_it(server, client):
    """vLLM's `priority`: the "secure" app schedules by it (the engine tests check the order and the
    preemptions), and its answers do not depend on it; a first-come-first-served app refuses it."""
    secure = openai.OpenAI(base_url=f"{server}/secure/v1", api_key="k1", max_retries=0, timeout=CLIENT_TIMEOUT_S)
    texts = {k: secure.completions.create(model="tiny", prompt="sort: cba =>", max_tokens=16,
                                          extra_body={"priority": k}).choices[0].text for k in (-1, 0, 3)}
    assert len(set(texts.values())) == 1
    assert _engine_info("secure")["scheduling_policy"] == "priority" and _engine_info()["scheduling_policy"] == "fcfs"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="sort: cba =>", max_tokens=16, extra_body={"priority": 1})
    assert e.value.body["param"] == "priority" and "scheduling_policy is priority" in e.value.body["message"]


def test_reconfigure_changes_decoding_defaults_without_a_restart(server):
    """Serve calls reconfigure(user_config) when `serve deploy` changes the decoding defaults."""
    from ray import serve

    handle = serve.get_deployment_handle("EngineServer", app_name="main")
    pid = _engine_info()["pid"]
    handle.reconfigure.remote({"block_size": 4, "max_tokens": 12}).result()
    try:
        info = _engine_info()
        assert info["defaults"]["block_size"] == 4 and info["defaults"]["max_tokens"] == 12
        assert info["pid"] == pid
        r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7, 8, 9]}).json()
        assert r["usage"]["completion_tokens"] <= 12
        with pytest.raises(Exception, match="unknown key"):
            handle.reconfigure.remote({"block_sise": 4}).result()
    finally:
        handle.reconfigure.remote(APP_ARGS["decoding"]).result()


def test_blocks_above_the_replicas_max_block_size_are_refused(server):
    """max_block_size (APP_ARGS: 16) bounds what a request may ask of a replica's memory: a larger block is
    a 400 that names the limit, streamed or not, and a new default above it is refused by reconfigure."""
    from ray import serve

    for stream in (False, True):
        r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 8,
                                                         "block_size": 32, "stream": stream}, timeout=60)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "block_size", r.text
        assert "block_size 32 is larger than this server's max_block_size 16" in err["message"]
    ok = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 8,
                                                      "block_size": 16}, timeout=60)
    assert ok.status_code == 200, ok.text
    handle = serve.get_deployment_handle("EngineServer", app_name="main")
    with pytest.raises(Exception, match="block_size 32 is larger than this replica's max_block_size 16"):
        handle.reconfigure.remote({**APP_ARGS["decoding"], "block_size": 32}).result()
    assert _engine_info()["defaults"]["block_size"] == 8


def test_a_dead_replica_is_replaced(server):
    import ray

    pid = _engine_info()["pid"]
    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                   if "main" in a["name"] and "EngineServer" in a["name"] and a["name"].startswith("SERVE_REPLICA"))
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    # A new replica's process loads and warms the engine: seconds here, over a minute on a loaded 2-core machine.
    deadline = time.time() + 180
    ok = False
    while time.time() < deadline and not ok:
        try:
            r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 8}, timeout=10)
            ok = r.status_code == 200
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    assert ok
    assert _engine_info()["pid"] != pid


def test_the_requests_of_one_prompt_meet_on_one_replica_and_its_prefix_cache(server, client, model_dir):
    """Two replicas behind the prompt-affinity router: a prompt asked again goes where its K/V are
    (under Serve's default routing each repeat would have an even chance of missing them), and every
    engine call of one HTTP request (n samples of several prompts) is routed and answered."""
    from ray import serve

    from serve.app import build_app

    serve.run(build_app({"model": str(model_dir), **APP_ARGS, "num_replicas": 2}), name="pair", route_prefix="/pair")
    pair = openai.OpenAI(base_url=f"{server}/pair/v1", api_key="unused", max_retries=0, timeout=CLIENT_TIMEOUT_S)
    for prompt in ([31, 32, 33, 34, 35, 36], [41, 42, 43, 44, 45]):
        cached = [pair.completions.create(model="tiny", prompt=prompt, max_tokens=16).usage.prompt_tokens_details
                  .cached_tokens for _ in range(4)]
        assert cached == [0] + [len(prompt)] * 3
    many = dict(model="tiny", prompt=[[11, 12, 13], [14, 15, 16, 17], [18, 19]], n=3, temperature=1.0, seed=5,
                max_tokens=16)
    answers = [c.text for c in pair.completions.create(**many).choices]
    assert answers == [c.text for c in client.completions.create(**many).choices]  # the one-replica app's
    serve.delete("pair")


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(server, endless_dir):
    from ray import serve

    from serve.app import build_app

    serve.run(build_app({"model": str(endless_dir), **APP_ARGS, "min_replicas": 1, "max_replicas": 2,
                         "target_ongoing_requests": 1, "upscale_delay_s": 0, "downscale_delay_s": 2,
                         "metrics_interval_s": 0.5, "look_back_period_s": 1}), name="scale", route_prefix="/scale")

    def running():
        dep = serve.status().applications["scale"].deployments["EngineServer"]
        return dep.replica_states.get("RUNNING", 0)

    assert running() == 1
    body = {"model": "tiny", "prompt": [5, 6, 7, 8, 9], "max_tokens": 1024, "block_size": 1, "threshold": 1.0}
    stop = threading.Event()

    def load():
        while not stop.is_set():
            assert httpx.post(f"{server}/scale/v1/completions", json=body, timeout=120).status_code == 200

    peak = 1
    with cf.ThreadPoolExecutor(6) as pool:
        workers = [pool.submit(load) for _ in range(6)]
        deadline = time.time() + 90
        while time.time() < deadline and peak < 2:
            peak = max(peak, running())
            time.sleep(0.3)
        stop.set()
        for w in workers:
            w.result()
    assert peak == 2
    deadline = time.time() + 60
    while time.time() < deadline and running() > 1:
        time.sleep(0.5)
    assert running() == 1
    serve.delete("scale")


def test_engine_metrics_reach_the_prometheus_endpoint(server, client):
    import ray

    for _ in range(2):  # the second time from the prefix cache
        client.completions.create(model="tiny", prompt=[5, 6, 7, 8, 9], max_tokens=16)
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = {"ray_dllm_requests_total", "ray_dllm_forwards_total", "ray_dllm_tokens_per_forward_bucket",
              "ray_dllm_time_to_first_block_s_bucket", "ray_dllm_queue_depth", "ray_dllm_running_requests",
              "ray_dllm_kv_cache_usage", "ray_dllm_cached_prompt_tokens_total"}
    found = set()
    deadline = time.time() + 60
    while time.time() < deadline and not wanted <= found:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        found = {line.split("{")[0] for line in text.splitlines() if line.startswith("ray_dllm")}
        time.sleep(1)
    assert wanted <= found


def test_a_replica_short_of_kv_pages_preempts_and_answers_the_same(server, model_dir):
    """The secure app's pool holds 512 tokens, a quarter of 8 x 256: eight answers of 48 tokens after
    prompts of ~40 outgrow it, so the newest are preempted and resumed, their K/V rebuilt by forwards
    (the app's preemption_mode=recompute: nothing goes to host memory). Every answer is the one the
    engine gives alone (with the app's FP8 weights), and the preemptions, the rebuilt positions and the
    swapped bytes reach Prometheus."""
    import ray

    secure = openai.OpenAI(base_url=f"{server}/secure/v1", api_key="k1", max_retries=0, timeout=CLIENT_TIMEOUT_S)
    prompts = [f"{i} reverse: abcdef => fedcba sort: dcba =>" for i in range(8)]
    before = _engine_info("secure")
    out = secure.completions.create(model="tiny", prompt=prompts, max_tokens=48, extra_body={"ignore_eos": True})
    after = _engine_info("secure")
    assert after["preemptions"] > before["preemptions"] and after["rebuilt_tokens"] > before["rebuilt_tokens"]
    assert after["swapped_bytes"] == 0 and after["quantization"] == "fp8"
    engine = dllm.Engine(dllm.load_model(model_dir), dllm.load_tokenizer(model_dir), max_model_len=256,
                         quantization="fp8")
    cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=48, early_stop=True, stops_last=True, ignore_eos=True)
    alone = [engine.generate([p], cfg)[0].text for p in prompts]
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == alone
    port = ray._private.worker.global_worker.node.metrics_export_port
    names = ("ray_dllm_preemptions_total", "ray_dllm_rebuilt_kv_tokens_total", "ray_dllm_swapped_kv_bytes")
    deadline, missing = time.time() + 60, names
    while time.time() < deadline and missing:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        missing = [name for name in names if name not in text]
        time.sleep(1)
    assert not missing


def test_stops_last_is_on_by_default_and_a_request_option(server, model_dir):
    engine = dllm.Engine(dllm.load_model(model_dir), dllm.load_tokenizer(model_dir), max_model_len=256)
    prompt = "reverse: x =>"  # a prompt whose answer the two orders end at different places
    texts = []
    for option in (None, False):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 48, **({} if option is None else {"stops_last": option})}
        r = httpx.post(f"{server}/v1/completions", json=body)
        cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=48, early_stop=True, stops_last=option is None)
        texts.append(r.json()["choices"][0]["text"])
        assert r.status_code == 200 and texts[-1] == engine.generate([prompt], cfg)[0].text
    assert texts[0] != texts[1]


def test_cache_policy_is_a_request_option(server):
    r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "add 1+2 =>", "max_tokens": 16,
                                                      "cache_policy": "vicinity"})
    assert r.status_code == 200
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_engine_loop_runs_calls_between_steps_and_hands_back_their_errors(talkative_model):
    """Work on the model (likelihood scoring) runs on the engine thread, interleaved with generation."""
    import asyncio

    from dllm.engine.async_loop import EngineLoop

    loop = EngineLoop(dllm.Engine(talkative_model, max_model_len=256))
    cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=32)
    threads = []

    def on_engine_thread():
        threads.append(threading.current_thread().name)
        return dllm.log_likelihood(talkative_model, [9, 12], [14, 22], mc_samples=4).value

    async def main():
        async def generate():
            return [out async for out in loop.generate([9, 12, 15], cfg)][-1].generation

        gen, value = await asyncio.gather(generate(), loop.call(on_engine_thread))
        with pytest.raises(ValueError, match="continuation is empty"):
            await loop.call(lambda: dllm.log_likelihood(talkative_model, [9], []))
        return gen, value, await loop.call(lambda: 7)

    try:
        gen, value, after = asyncio.run(main())
    finally:
        loop.shutdown(timeout=5)
    assert gen.finish_reason in ("stop", "length") and value < 0 and after == 7  # the loop survived the error
    assert threads == ["dllm-engine-loop"]
