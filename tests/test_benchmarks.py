"""Benchmark plumbing that later GPU runs depend on (the measurements themselves run on the GPU box)."""

import json

import pytest

from benchmarks import objective_bench, trained_compare

TINY = ["--device", "cpu", "--size", "tiny", "--minutes", "0.02", "--batch", "4", "--seq-len", "64",
        "--train-samples", "500", "--heldout", "4", "--skip-baselines", "--decoders", "threshold", "--concurrency", "2"]


def test_trained_compare_trains_each_model_and_evaluates_in_separate_runs(tmp_path):
    work, out = tmp_path / "work", tmp_path / "result.json"
    with pytest.raises(SystemExit):  # the twin's step count comes from the dLLM-Var run
        trained_compare.main(TINY + ["--work-dir", str(work), "--only-train", "autoregressive"])

    trained_compare.main(TINY + ["--work-dir", str(work), "--only-train", "dllm-var"])
    dllm_steps = json.loads((work / "dllm-var" / "training.json").read_text())["steps"]
    assert not (work / "autoregressive").exists()
    trained_compare.main(TINY + ["--work-dir", str(work), "--only-train", "autoregressive"])
    assert json.loads((work / "autoregressive" / "training.json").read_text())["steps"] == dllm_steps

    weights = {k: (work / k / "model.safetensors").stat().st_mtime_ns for k in ("dllm-var", "autoregressive")}
    trained_compare.main(TINY + ["--work-dir", str(work), "--json", str(out)])
    result = json.loads(out.read_text())
    assert [t["steps"] for t in result["training"]] == [dllm_steps, dllm_steps]  # loaded, not retrained
    assert {k: (work / k / "model.safetensors").stat().st_mtime_ns for k in weights} == weights
    systems = {s["system"] for s in result["systems"]}
    assert "engine (threshold)" in systems and any(s.startswith("autoregressive") for s in systems)


def test_objective_bench_scores_each_model_during_training(tmp_path):
    out = tmp_path / "curve.json"
    objective_bench.main(["--device", "cpu", "--size", "tiny", "--steps", "4", "--evaluate-every", "2", "--batch", "4",
                          "--seq-len", "64", "--train-samples", "500", "--heldout", "4", "--variants", "tail-eos",
                          "--decoders", "threshold", "fixed_k", "--json", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert [(r["variant"], r["system"]) for r in runs][:2] == [("tail-eos", "engine (threshold)"),
                                                               ("tail-eos", "engine (fixed_k)")]
    dllm_curve, ar_curve = runs[0]["training"]["curve"], runs[-1]["training"]["curve"]
    assert [p["step"] for p in dllm_curve] == [2, 4] and [p["step"] for p in ar_curve] == [2, 4]
    assert set(dllm_curve[0]) == {"step", "threshold", "fixed_k"}
    assert 0.0 <= dllm_curve[-1]["fixed_k"]["exact_match"] <= 1.0 and "exact_match" in ar_curve[-1]
    assert runs[0]["training"]["steps"] == 4  # scoring does not eat into the training

