"""Benchmark plumbing that later GPU runs depend on (the measurements themselves run on the GPU box)."""

import json

import pytest

from benchmarks import trained_compare

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
