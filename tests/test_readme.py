"""The README stays true: its commands are the ones CI and users run, and the CPU-runnable ones work."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def test_readme_opens_with_the_install_and_quickstart_command_then_the_test_command():
    main, tests = _bash_blocks()[:2]
    assert main.strip().endswith("dllm quickstart")
    assert tests.strip().endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    install_and_test = tests.strip().split("&& ", 2)[-1]  # what follows creating and activating the venv
    assert install_and_test in ci


@pytest.mark.parametrize("command", [
    ["-m", "dllm.cli", "--help"], ["-m", "pipelines.pack", "--help"], ["-m", "train.sft", "--help"],
    ["-m", "dllm.cli", "serve", "--help"], ["-m", "dllm.cli", "quickstart", "--help"],
])
def test_documented_entry_points_answer_help(command):
    out = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()


@pytest.mark.parametrize("flag,value,message", [("--pad-eos-weight", "2", "pad_eos_weight=2.0 is invalid; expected a weight in [0, 1]"),
                                                ("--eos-pad", "-1", "--eos-pad is the most extra EOS tokens per response: >= 0"),
                                                ("--workers", "0", "num_workers=0 is invalid"),
                                                ("--cut-answer", "1.5", "cut_answer_prob=1.5 is invalid")])
def test_quickstart_refuses_bad_objective_settings_before_doing_any_work(tmp_path, flag, value, message):
    out = subprocess.run([sys.executable, "-m", "dllm.cli", "quickstart", "--workdir", str(tmp_path / "w"), flag, value],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and message in out.stderr and not (tmp_path / "w").exists()


def test_dllm_data_synthetic_writes_variable_length_answers(tmp_path):
    subprocess.run([sys.executable, "-m", "dllm.cli", "data", "synthetic", "--out", str(tmp_path), "--train", "500",
                    "--heldout", "50"], check=True, cwd=ROOT, timeout=120)
    rows = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    held = [json.loads(line) for line in open(tmp_path / "heldout.jsonl")]
    assert len(rows) == 500 and len(held) == 50
    lengths = {len(r["output"]) for r in rows}
    assert min(lengths) == 1 and max(lengths) >= 20
    assert not {r["instruction"] for r in held} & {r["instruction"] for r in rows}


def test_max_word_len_shortens_the_strings_but_keeps_every_answer_format(tmp_path):
    from dllm.synthetic import make_samples

    default = make_samples(2000, seed=3)
    capped = make_samples(2000, seed=3, max_word_len=5)
    words = lambda samples, task: [s["instruction"].split()[1] for s in samples if s["task"] == task]  # noqa: E731
    assert max(map(len, words(default, "reverse"))) == 12 and max(map(len, words(capped, "reverse"))) == 5
    assert {s["task"] for s in capped} == {s["task"] for s in default}
    # Repeat still builds long answers from short words: the length range survives the cap.
    assert max(len(s["output"]) for s in capped) >= 20 and min(len(s["output"]) for s in capped) == 1
    subprocess.run([sys.executable, "-m", "dllm.cli", "data", "synthetic", "--out", str(tmp_path), "--train", "200",
                    "--heldout", "20", "--tasks", "sort", "--max-word-len", "3"], check=True, cwd=ROOT, timeout=120)
    rows = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    assert all(len(r["output"]) <= 3 for r in rows)
    with pytest.raises(ValueError, match="max_word_len must be >= 1"):
        make_samples(1, max_word_len=0)


@pytest.mark.slow
def test_quickstart_runs_every_stage_end_to_end(tmp_path):
    """The README's main command, shortened (30 s of training): every stage runs and the report is written."""
    out = subprocess.run(
        [sys.executable, "-m", "dllm.cli", "quickstart", "--workdir", str(tmp_path), "--minutes", "0.3",
         "--train-samples", "1500", "--heldout", "12", "--port", "8437"],
        capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for n in range(1, 7):
        assert f"=== [{n}/6]" in out.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["prompts"] == 12
    assert report["train"]["tail_eos"] and report["train"]["document_mask"]  # the quickstart's objective
    assert report["train"]["last_eval_loss"] > 0  # the held-out prompts, packed, scored as it trained
    assert "held-out loss" in out.stdout
    served = report["served"]
    # 18 s of training: the model may answer every prompt with a bare EOS (0 tokens, TPF 0); what must
    # hold is that every prompt went through the HTTP API and was measured.
    assert 0 <= served["exact_match"] <= 1 and served["tpf"] >= 0 and 0 <= served["self_stopped"] <= 1
    assert served["produced_len"]["min"] >= 0 and served["target_len"]["max"] >= 1
    # 18 s of training: the baseline may answer nothing at all, and then no ratio is reported; where
    # only the served model answers nothing (a bare EOS each, more likely when a busy machine trains
    # fewer steps), the ratio is a measured 0.
    assert report["vanilla"]["prompts"] == 12 and report["vanilla"]["tokens_per_s"] >= 0
    speedup = report["speedup_tps_vs_vanilla"]
    assert (speedup is None) == (report["vanilla"]["tokens_per_s"] == 0)
    assert speedup is None or (speedup == 0) == (served["tokens_per_s"] == 0)
    assert "quickstart report" in out.stdout


@pytest.mark.parametrize("speedup, shown", [(0.0, "0.0x"), (17.8, "17.8x"), (None, "no ratio")])
def test_quickstart_report_prints_a_measured_zero_ratio_as_a_ratio(capsys, speedup, shown):
    from dllm.quickstart import print_report

    lengths = {"min": 0, "median": 1, "max": 2}
    served = {"concurrency": 8, "exact_match": 0.0, "self_stopped": 1.0, "target_len": lengths, "produced_len": lengths,
              "tokens_per_s": 0.0, "tpf": 0.0, "per_task_exact_match": {"sort": 0.0}}
    vanilla = {"prompts": 2, "engine_batch1_tokens_per_s": 0.0, "engine_batch1_tpf": 0.0, "engine_batch1_exact_match": 0.0,
               "gen_length": 64, "steps": 64, "tokens_per_s": 3.0, "tpf": 0.1, "exact_match": 0.0,
               "speedup_batch1": speedup}
    print_report({"prompts": 2, "served": served, "vanilla": vanilla, "examples": [], "elapsed_s": 60.0})
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("batch 1"))
    assert line.endswith(shown) if shown != "no ratio" else "no ratio" in line
