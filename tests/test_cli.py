"""`dllm generate`: the engine from the command line, no Ray."""

import subprocess
import sys
from pathlib import Path

import pytest

import dllm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, talkative_model, char_tokenizer):
    return dllm.save_pretrained(talkative_model, char_tokenizer, tmp_path_factory.mktemp("cli") / "tiny")


def _generate(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dllm.cli", "generate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_generate_prints_what_the_engine_decodes(checkpoint):
    prompts = ["reverse: abcd =>", "sort: ba =>"]
    out = _generate("--model", str(checkpoint), "--prompt", prompts[0], "--prompt", prompts[1], "--block-size", "8",
                    "--max-new-tokens", "32", "--temperature", "1.0", "--seed", "4", "--stop", "vv")
    assert out.returncode == 0, out.stderr
    engine = dllm.Engine(dllm.load_model(checkpoint), dllm.load_tokenizer(checkpoint), max_batch_size=2)
    cfg = dllm.GenerationConfig(block_size=8, max_new_tokens=32, temperature=1.0, seed=4, stop=["vv"], early_stop=True)
    gens = engine.generate(prompts, cfg)
    assert any(g.text for g in gens)
    for prompt, gen in zip(prompts, gens):
        assert f"> {prompt}\n{gen.text}\n[{gen.finish_reason}, {len(gen.token_ids)} tokens" in out.stdout


def test_generate_refuses_bad_settings_with_a_message(checkpoint):
    out = _generate("--model", str(checkpoint), "--prompt", "x", "--decoder", "beam")
    assert out.returncode == 2 and "invalid choice: 'beam'" in out.stderr
    out = _generate("--model", str(checkpoint), "--prompt", "x", "--threshold", "0")
    assert out.returncode == 2 and "threshold" in out.stderr and "Traceback" not in out.stderr
