"""The command line without Ray: `dllm generate`, `dllm score`, and the app `dllm serve` builds from its flags."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import dllm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, talkative_model, char_tokenizer):
    return dllm.save_pretrained(talkative_model, char_tokenizer, tmp_path_factory.mktemp("cli") / "tiny")


def _dllm(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dllm.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def _generate(*args) -> subprocess.CompletedProcess:
    return _dllm("generate", *args)


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_generate_prints_what_the_engine_decodes(checkpoint, quantization):
    prompts = ["reverse: abcd =>", "sort: ba =>"]
    out = _generate("--model", str(checkpoint), "--prompt", prompts[0], "--prompt", prompts[1], "--block-size", "8",
                    "--max-new-tokens", "32", "--temperature", "1.0", "--top-k", "5", "--top-p", "0.95", "--seed", "6",
                    "--stop", "vv", "--frequency-penalty", "0.5", "--repetition-penalty", "1.2",
                    *(["--quantization", quantization] if quantization else []))
    assert out.returncode == 0, out.stderr
    engine = dllm.Engine(dllm.load_model(checkpoint), dllm.load_tokenizer(checkpoint), max_batch_size=2,
                         quantization=quantization)
    cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=32, temperature=1.0, top_k=5, top_p=0.95, seed=6,
                                stop=["vv"], early_stop=True, frequency_penalty=0.5, repetition_penalty=1.2)
    gens = engine.generate(prompts, cfg)
    assert any(g.text for g in gens)
    for prompt, gen in zip(prompts, gens):
        assert f"> {prompt}\n{gen.text}\n[{gen.finish_reason}, {len(gen.token_ids)} tokens" in out.stdout


def test_generate_streams_each_answer_as_it_settles(checkpoint):
    prompts = ["reverse: abcd =>", "sort: ba =>"]
    out = _generate("--model", str(checkpoint), "--prompt", prompts[0], "--prompt", prompts[1], "--block-size", "16",
                    "--max-new-tokens", "32", "--stream")
    assert out.returncode == 0, out.stderr
    engine = dllm.Engine(dllm.load_model(checkpoint), dllm.load_tokenizer(checkpoint))
    cfg = dllm.GenerationConfig(block_size=16, max_new_tokens=32, early_stop=True)
    for prompt in prompts:  # one after the other, each the answer the engine gives it
        gen = engine.generate([prompt], cfg)[0]
        assert f"> {prompt}\n{gen.text}\n[{gen.finish_reason}, {len(gen.token_ids)} tokens" in out.stdout


def test_generate_refuses_bad_settings_with_a_message(checkpoint):
    out = _generate("--model", str(checkpoint), "--prompt", "x", "--decoder", "beam")
    assert out.returncode == 2 and "invalid choice: 'beam'" in out.stderr
    out = _generate("--model", str(checkpoint), "--prompt", "x", "--threshold", "0")
    assert out.returncode == 2 and "threshold" in out.stderr and "Traceback" not in out.stderr
    out = _generate("--model", str(checkpoint), "--prompt", "x", "--quantization", "int4")
    assert out.returncode == 2 and "invalid choice: 'int4'" in out.stderr


def test_generate_json_answers_in_json_mode_held_to_a_schema_and_says_why_it_cannot(checkpoint, tmp_path, json_tokenizer):
    from conftest import make_config

    json_ckpt = dllm.save_pretrained(dllm.build_model(make_config(json_tokenizer), seed=0), json_tokenizer,
                                     tmp_path / "json")
    out = _generate("--model", str(json_ckpt), "--prompt", "an object", "--block-size", "8", "--max-new-tokens", "24",
                    "--json", "--temperature", "1.0", "--seed", "2")
    assert out.returncode == 0, out.stderr
    engine = dllm.Engine(dllm.load_model(json_ckpt), json_tokenizer)
    gen = engine.generate(["an object"], dllm.GenerationConfig(block_size=8, max_new_tokens=24, early_stop=True,
                                                               response_format="json_object", temperature=1.0, seed=2))[0]
    assert gen.text.startswith("{") and f"> an object\n{gen.text}\n[{gen.finish_reason}" in out.stdout
    out = _generate("--model", str(checkpoint), "--prompt", "x", "--json")  # its characters hold no '{'
    assert out.returncode == 2 and "starts a JSON object" in out.stderr and "Traceback" not in out.stderr
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}))
    out = _generate("--model", str(json_ckpt), "--prompt", "ok?", "--block-size", "8", "--max-new-tokens", "80",
                    "--json-schema", str(schema))
    assert out.returncode == 0, out.stderr
    answer, summary = out.stdout.split("> ok?\n", 1)[1].rsplit("\n[", 1)  # the answer may hold newlines
    assert set(json.loads(answer)) == {"ok"} and summary.startswith("stop,")
    schema.write_text(json.dumps({"type": "object", "properties": {"when": {"type": "string", "format": "date"}}}))
    out = _generate("--model", str(json_ckpt), "--prompt", "x", "--json-schema", str(schema))
    assert out.returncode == 2 and "format at #/properties/when" in out.stderr and "Traceback" not in out.stderr


def test_score_prints_each_continuations_estimate_and_marks_the_best(checkpoint):
    conts = [" abcd", " dcba", " xyz"]
    args = ["score", "--model", str(checkpoint), "--prompt", "sort: dcba =>", "--mc-samples", "8", "--seed", "1"]
    out = _dllm(*args, *[x for c in conts for x in ("--continuation", c)])
    assert out.returncode == 0, out.stderr
    tok = dllm.load_tokenizer(checkpoint)
    model = dllm.load_model(checkpoint)
    prompt = tok("sort: dcba =>", add_special_tokens=False)["input_ids"]
    values = [dllm.log_likelihood(model, prompt, tok(c, add_special_tokens=False)["input_ids"], mc_samples=8, seed=1)
              for c in conts]
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    for line, cont, v in zip(lines, conts, values):
        assert f"{v.value:10.3f} +- {v.std_error:.3f}  ({len(cont)} tokens)  {cont!r}" in line
    best = max(range(3), key=lambda i: values[i].value)
    assert [line.startswith("*") for line in lines] == [i == best for i in range(3)]
    out = _dllm(*args, "--continuation", "")
    assert out.returncode == 2 and "continuation is empty" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("flags, cached, routing, extra", [
    ([], True, "prompt_affinity", {}),
    (["--no-prefix-caching", "--routing", "power_of_two", "--kv-cache-tokens", "4096", "--page-allocation", "reserve"],
     False, "power_of_two", {"kv_cache_tokens": 4096, "page_allocation": "reserve"}),
    (["--preemption-mode", "recompute"], True, "prompt_affinity", {"preemption_mode": "recompute"}),
    (["--swap-space", "16", "--max-prefill-tokens", "2048"], True, "prompt_affinity",
     {"swap_space": 16.0, "max_prefill_tokens": 2048}),
    (["--quantization", "fp8"], True, "prompt_affinity", {"quantization": "fp8"}),
    (["--gpu-memory-utilization", "0.85", "--max-block-size", "128"], True, "prompt_affinity",
     {"gpu_memory_utilization": 0.85, "max_block_size": 128}),
    (["--decoder", "hierarchical", "--block-size", "32", "--threshold", "0.8", "--max-tokens", "512", "--dtype",
      "float16"], True, "prompt_affinity",  # the replicas' decoding defaults
     {"decoding": {"decoder": "hierarchical", "block_size": 32, "threshold": 0.8, "max_tokens": 512}, "dtype": "float16"}),
    (["--scheduling-policy", "priority"], True, "prompt_affinity", {"scheduling_policy": "priority"}),
    (["--chat-template", "{{ messages[0].content }}", "--cache-policy", "vicinity"], True, "prompt_affinity",
     {"chat_template": "{{ messages[0].content }}", "decoding": {"cache_policy": "vicinity"}}),
    (["--tool-call-parser", "hermes"], True, "prompt_affinity", {"tool_call_parser": "hermes"}),
    # vLLM's names of the same flags
    (["--served-model-name", "m", "--max-num-seqs", "16", "--api-key", "k", "--no-enable-prefix-caching",
      "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "-tp", "1"], False, "prompt_affinity",
     {"name": "m", "api_keys": "k", "tool_call_parser": "hermes"})])
def test_serve_flags_become_the_app_builders_keys(flags, cached, routing, extra):
    from ray.serve import Application

    from dllm.cli import build_parser, serve_app_args
    from serve.app import build_app

    args = build_parser().parse_args(["serve", "--model", "/models/x", "--max-replicas", "3", "--min-replicas", "1",
                                      *flags])
    app_args = serve_app_args(args)
    assert app_args == {"model": "/models/x", "max_batch_size": 16, "prefix_caching": cached, "routing": routing,
                        "min_replicas": 1, "max_replicas": 3, **extra}
    assert isinstance(build_app(app_args), Application)


def test_serve_refuses_vllm_flags_it_cannot_honour_before_starting_ray():
    """--enable-auto-tool-choice without a parser, and tensor parallelism: a CLI error, no Ray started."""
    for flags, message in [(["--enable-auto-tool-choice"], "--enable-auto-tool-choice needs --tool-call-parser"),
                           (["--tensor-parallel-size", "2"], "tensor_parallel_size > 1 is not supported")]:
        out = _dllm("serve", "--model", "/models/x", *flags)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
        assert "Ray" not in out.stderr + out.stdout
