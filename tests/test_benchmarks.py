"""Benchmark plumbing that later GPU runs depend on (the measurements themselves run on the GPU box)."""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import (ablation_bench, batch_job_bench, decode_step_bench, engine_bench, json_mode_bench, likelihood_bench, objective_bench,
                        priority_bench, serve_bench, step_overhead_bench, streaming_bench, tool_calls_bench,
                        trained_compare)
from benchmarks.report import write_json
from benchmarks.stats import paired_comparison, student_t_quantile, student_t_sf2

ROOT = Path(__file__).resolve().parents[1]

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
    trained_compare.main(TINY + ["--work-dir", str(work), "--fp8-decoders", "threshold", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [t["steps"] for t in result["training"]] == [dllm_steps, dllm_steps]  # loaded, not retrained
    assert {k: (work / k / "model.safetensors").stat().st_mtime_ns for k in weights} == weights
    systems = {s["system"] for s in result["systems"]}
    assert "engine (threshold)" in systems and any(s.startswith("autoregressive") for s in systems)
    assert "engine (threshold, stop tokens by confidence)" in systems  # the paper's decoding, for comparison
    fp8 = [s for s in result["systems"] if s["system"] == "engine (threshold, FP8 weights)"]
    assert [s["batch"] for s in fp8] == [1, 16] and all(s["prompts"] == 4 for s in fp8)
    # the comparison comes first (a device call cut short keeps it), each row with its ratio to the twin
    assert [(s["system"].split(" (")[0], s["batch"]) for s in result["systems"][:3]] == [
        ("engine", 1), ("engine", 1), ("autoregressive twin", 1)]
    assert result["systems"][0]["speedup_vs_ar"] == result["systems"][0]["tps"] / result["systems"][2]["tps"]


def test_trained_compare_writes_its_json_after_every_row(tmp_path, monkeypatch):
    out, snapshots = tmp_path / "result.json", []
    real_eval_engine = trained_compare.eval_engine

    def eval_engine(*args, **kwargs):  # what a time limit arriving now would leave on disk
        snapshots.append(json.loads(out.read_text()))
        return real_eval_engine(*args, **kwargs)

    monkeypatch.setattr(trained_compare, "eval_engine", eval_engine)
    trained_compare.main(TINY + ["--json", str(out)])
    assert [t["kind"] for t in snapshots[0]["training"]] == ["dllm-var", "autoregressive"]  # both trained first
    assert [len(s["systems"]) for s in snapshots] == [0, 1, 3, 4]  # the twin's batch-1 row before batch 16


def test_a_result_file_is_written_into_a_new_folder_and_replaced_whole(tmp_path, monkeypatch):
    out = tmp_path / "results" / "new-dir" / "run.json"
    write_json(out, {"rows": [1]})  # a results folder nobody made yet: made, not an error after the run
    assert json.loads(out.read_text()) == {"rows": [1]}

    def killed(*args):  # the run dies (a device call's time limit) in the middle of writing the next version
        raise KeyboardInterrupt

    monkeypatch.setattr("benchmarks.report.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_json(out, {"rows": [1, 2]})
    assert json.loads(out.read_text()) == {"rows": [1]}  # the last whole version, never half of the next
    write_json(None, {"rows": []})  # no --json: nothing written


def test_objective_bench_trains_each_variant_once_per_seed_and_reports_the_spread(tmp_path):
    out = tmp_path / "seeds.json"
    objective_bench.main(["--device", "cpu", "--size", "tiny", "--steps", "3", "--batch", "4", "--seq-len", "64",
                          "--train-samples", "300", "--heldout", "4", "--variants", "tail-eos", "--skip-ar",
                          "--seeds", "3", "7", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [(r["variant"], r["seed"], r["training"]["seed"]) for r in result["runs"]] == [("tail-eos", 3, 3),
                                                                                          ("tail-eos", 7, 7)]
    (row,) = result["over_seeds"]
    ems = [r["exact_match"] for r in result["runs"]]
    assert row["seeds"] == [3, 7] and row["exact_match"] == pytest.approx(sum(ems) / 2)
    assert (row["exact_match_min"], row["exact_match_max"]) == (min(ems), max(ems))
    assert row["per_task"] == pytest.approx({t: sum(r["per_task"][t] for r in result["runs"]) / 2
                                             for t in result["runs"][0]["per_task"]})
    with pytest.raises(SystemExit):
        objective_bench.main(["--seeds", "1", "1", "--steps", "1"])


def test_student_t_agrees_with_the_printed_tables():
    for df, t975 in [(1, 12.706), (4, 2.776), (10, 2.228), (30, 2.042)]:
        assert student_t_quantile(0.975, df) == pytest.approx(t975, abs=1e-3)
    assert student_t_sf2(0.0, 4) == pytest.approx(1.0)
    assert student_t_sf2(2.776, 4) == pytest.approx(0.05, abs=1e-4)
    assert student_t_sf2(-2.776, 4) == student_t_sf2(2.776, 4)


def test_a_paired_comparison_is_resolved_only_where_the_seeds_agree():
    baseline = {0: 0.60, 1: 0.35, 2: 0.50, 3: 0.70, 4: 0.45}  # a wide spread between seeds
    shifted = {s: v + d for (s, v), d in zip(baseline.items(), [0.10, 0.12, 0.08, 0.11, 0.09])}
    up = paired_comparison(baseline, shifted)
    assert up["differences"] == pytest.approx([0.10, 0.12, 0.08, 0.11, 0.09]) and up["mean"] == pytest.approx(0.10)
    assert up["resolved"] and up["ci95"][0] > 0 and up["p_t"] < 0.001
    assert up["p_sign_flip"] == 2 / 32  # all five the same sign: the least 5 seeds can show without assumptions
    mixed = paired_comparison(baseline, {s: v + d for (s, v), d in zip(baseline.items(), [0.2, -0.15, 0.1, -0.2, 0.1])})
    assert not mixed["resolved"] and mixed["ci95"][0] < 0 < mixed["ci95"][1] and mixed["p_sign_flip"] > 0.5
    assert paired_comparison({0: 0.5, 1: 0.5, 9: 0.1}, {0: 0.5, 1: 0.5})["seeds"] == [0, 1]  # the shared seeds
    with pytest.raises(ValueError, match="2 or more shared seeds"):
        paired_comparison({0: 0.5, 1: 0.4}, {1: 0.6, 2: 0.3})


def test_objective_bench_reports_earlier_runs_seed_by_seed_against_a_baseline(tmp_path, capsys):
    def run(variant, seed, em, system="engine (threshold)"):
        return {"variant": variant, "system": system, "seed": seed, "exact_match": em,
                "length_match": em, "self_stopped": 1.0, "tpf": 1.5, "per_task": {"sort": em}}

    first, second, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "together.json"
    first.write_text(json.dumps({"runs": [run("mask", s, em) for s, em in [(0, 0.6), (1, 0.35), (2, 0.5)]]}))
    second.write_text(json.dumps({"runs": [run("mask-cut", s, em) for s, em in [(0, 0.7), (1, 0.47), (2, 0.58)]]
                                  + [run("autoregressive twin", s, 0.9, "autoregressive (HF generate)")
                                     for s in (0, 1)]}))
    objective_bench.main(["--from-json", str(first), str(second), "--baseline", "mask", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["runs"]][:6] == ["mask"] * 3 + ["mask-cut"] * 3  # nothing trained
    assert [row["exact_match"] for row in result["over_seeds"]] == pytest.approx([0.4833, 0.5833, 0.9], abs=1e-4)
    cut, twin = result["paired"]
    assert (cut["variant"], cut["baseline"], cut["seeds"]) == ("mask-cut", "mask", [0, 1, 2])
    assert cut["differences"] == pytest.approx([0.10, 0.12, 0.08]) and cut["resolved"]
    # a system the baseline was not scored with (the twin) is paired with the baseline's, on the seeds both ran
    assert (twin["baseline_system"], twin["seeds"]) == ("engine (threshold)", [0, 1])
    assert twin["differences"] == pytest.approx([0.30, 0.55])
    assert "seed by seed against mask" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the same run twice would count one seed twice
        objective_bench.main(["--from-json", str(first), str(first)])
    with pytest.raises(SystemExit):  # a baseline with no runs
        objective_bench.main(["--from-json", str(first), str(second), "--baseline", "paper"])


def test_a_training_seed_draws_the_weights_and_batches_and_reproduces_its_run():
    p = argparse.ArgumentParser()
    trained_compare.add_run_arguments(p)
    args = p.parse_args(["--device", "cpu", "--size", "tiny", "--batch", "4", "--seq-len", "64",
                         "--train-samples", "200", "--heldout", "2", "--warmup", "1"])
    tok, _, data, _ = trained_compare.build_data(args)
    cfg = trained_compare.model_config(tok, "tiny")
    objective = objective_bench.VARIANTS["tail-eos"]

    def weights(seed):
        model, info = trained_compare.train("dllm-var", cfg, data, args, steps=2, objective=objective, seed=seed)
        assert info["seed"] == seed
        return torch.cat([w.flatten() for w in model.state_dict().values()])

    assert torch.equal(weights(1), weights(1))
    assert not torch.allclose(weights(1), weights(2))


def test_objective_bench_scores_each_model_during_training(tmp_path):
    out = tmp_path / "curve.json"
    objective_bench.main(["--device", "cpu", "--size", "tiny", "--steps", "4", "--evaluate-every", "2", "--batch", "4",
                          "--seq-len", "64", "--train-samples", "500", "--heldout", "4", "--variants", "tail-eos",
                          "tail-eos-document-mask", "--decoders", "threshold", "fixed_k", "--json", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert [(r["variant"], r["system"]) for r in runs][:2] == [("tail-eos", "engine (threshold)"),
                                                               ("tail-eos", "engine (fixed_k)")]
    dllm_curve, ar_curve = runs[0]["training"]["curve"], runs[-1]["training"]["curve"]
    assert [p["step"] for p in dllm_curve] == [2, 4] and [p["step"] for p in ar_curve] == [2, 4]
    assert set(dllm_curve[0]) == {"step", "threshold", "fixed_k"}
    assert 0.0 <= dllm_curve[-1]["fixed_k"]["exact_match"] <= 1.0 and "exact_match" in ar_curve[-1]
    assert runs[0]["training"]["steps"] == 4  # scoring does not eat into the training
    assert [r["training"]["objective"]["document_mask"] for r in runs[:4]] == [False, False, True, True]


def run_args(extra):  # trained_compare's data arguments, parsed
    p = argparse.ArgumentParser()
    trained_compare.add_run_arguments(p)
    return p.parse_args(["--device", "cpu"] + extra)


def test_eos_padding_ends_each_dllm_answer_in_extra_eos_and_leaves_the_twins_rows_plain():
    """Objective.eos_pad: every answer's EOS is followed by 0..N more (terminal tokens, so always
    masked and trained to say EOS); the AR twin reads the rows without them; no sample is lost."""
    args = run_args(["--train-samples", "300", "--seq-len", "64"])
    tok, _, data, _ = trained_compare.build_data(args)
    eos = tok.eos_token_id

    def eos_runs(rows):  # lengths of the EOS runs that end each sample
        runs, n = [], 0
        for tok_id in [t for row, seg in zip(rows.input_ids, rows.segment_ids) for t, s in zip(row, seg) if s > 0]:
            if tok_id == eos:
                n += 1
            elif n:
                runs.append(n)
                n = 0
        return runs + ([n] if n else [])

    plain, padded = data.packed(), data.packed(8)
    assert set(eos_runs(plain)) == {1}
    runs = eos_runs(padded)
    assert len(runs) == len(eos_runs(plain)) == len(data.samples)
    assert min(runs) == 1 and max(runs) == 9 and len(set(runs)) == 9
    assert data.packed(8) is padded  # packed once per padding
    with pytest.raises(ValueError, match="eos_pad"):
        trained_compare.Objective(eos_pad=-1)


def test_ablation_bench_has_a_row_per_decoder_threshold_policy_and_stop_order(tmp_path, tiny_checkpoint):
    prompts, out = tmp_path / "heldout.jsonl", tmp_path / "ablation.json"
    prompts.write_text("".join(json.dumps({"instruction": f"copy {w} = ", "output": w}) + "\n" for w in ("ab", "cd", "e")))
    ablation_bench.main(["--model", str(tiny_checkpoint), "--prompts-jsonl", str(prompts), "--device", "cpu",
                         "--dtype", "float32", "--block-size", "8", "--max-new-tokens", "16", "--decoders", "threshold",
                         "fixed_k", "hierarchical", "--thresholds", "0.9", "0.5", "--policies", "dllm-var",
                         "--quantizations", "fp8", "none", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(r["quantization"], r["decoder"], r["threshold"], r["stop_order"]) for r in rows] == [
        (weights, decoder, tau, order) for weights in ("none", "fp8")  # unquantised first: quantising is one-way
        for decoder, tau in [("threshold", 0.9), ("threshold", 0.5), ("fixed_k", None), ("hierarchical", 0.9),
                             ("hierarchical", 0.5)]
        for order in ("last", "confidence")]  # fixed_k has no threshold
    assert rows[0]["tps_vs_default"] == 1.0 and all(r["prompts"] == 3 for r in rows)


def test_likelihood_bench_scores_every_choice_and_splits_wrong_generations(tmp_path, tiny_checkpoint):
    prompts, out = tmp_path / "heldout.jsonl", tmp_path / "likelihood.json"
    rows = [{"instruction": f"copy {w} = ", "output": w, "task": "copy"} for w in ("ab", "cd", "e", "fgh")]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = likelihood_bench.main(["--model", str(tiny_checkpoint), "--prompts-jsonl", str(prompts), "--device", "cpu",
                                    "--dtype", "float32", "--distractors", "2", "--mc-samples", "2", "4",
                                    "--rerank-samples", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == report
    assert [(r["distractors"], r["mc_samples"]) for r in report["results"]] == [("other", 2), ("other", 4),
                                                                                 ("edit", 2), ("edit", 4)]
    assert all(r["prompts"] == 4 and r["choices"] == 3 and 0 <= r["accuracy"] <= 1 for r in report["results"])
    g = report["generation"]  # an untrained model: every generation is wrong
    assert g["exact_match"] == 0 and g["wrong"] == 4 and 0 <= g["truth_scores_higher"] <= 4
    rerank = report["rerank"]
    assert rerank["samples"] == 2 and rerank["mc_samples"] == 4 and rerank["greedy_threshold"] == g["exact_match"]
    assert max(rerank["elbo_pick"], rerank["majority_vote"], rerank["fixed_k_1"]) <= rerank["oracle"]
    rng = likelihood_bench.random.Random(0)
    edits = likelihood_bench.distractors(rows[3], rows, "edit", 3, rng)
    assert len(set(edits)) == 3 and all(len(e) == 3 and sum(a != b for a, b in zip(e, "fgh")) == 1 for e in edits)
    assert set(likelihood_bench.distractors(rows[0], rows, "other", 3, rng)) == {"cd", "e", "fgh"}
    with pytest.raises(ValueError, match="lower --distractors"):
        likelihood_bench.distractors(rows[0], rows, "other", 4, rng)


def test_engine_bench_compares_logprobs_sampling_penalties_shared_prefills_prefix_caching_paging_and_baselines(
        tmp_path):
    out = tmp_path / "engine.json"
    engine_bench.main(["--device", "cpu", "--dtype", "float32", "--num-prompts", "2", "--prompt-len", "8",
                       "--block-size", "8", "--fast-block", "8", "--max-new-tokens", "32", "--d-model", "64",
                       "--layers", "1", "--heads", "2", "--vocab", "128", "--vanilla-gen-lengths", "16",
                       "--logprobs", "3", "--top-p", "0.9", "--nucleus-candidates", "16", "--penalties",
                       "--samples", "3", "--prefix-caching",
                       "--kv-cache-tokens", "64", "--pool-max-model-len", "64", "--json", str(out)])
    rows = {r["system"]: r for r in json.loads(out.read_text())["results"]}
    plain, with_lp = rows["dllm-var engine (threshold)"], rows["dllm-var engine (threshold, logprobs 3)"]
    assert (with_lp["tokens"], with_lp["forwards"]) == (plain["tokens"], plain["forwards"])  # same decoding
    for name in ("dllm-var engine (threshold, sampled)", "dllm-var engine (threshold, sampled, top_p 0.9)",
                 "dllm-var engine (threshold, sampled, top_p 0.9, top_k 50)",
                 "dllm-var engine (threshold, presence, frequency and repetition penalties)"):
        assert rows[name]["tokens"] > 0 and rows[name]["forwards"] > 0
    few, whole = (rows[f"dllm-var engine (threshold, sampled, top_p 0.9{how})"]
                  for how in ("", ", whole vocabulary ranked"))
    assert (few["tokens"], few["forwards"]) == (whole["tokens"], whole["forwards"])  # the same draws
    shared, apart = (rows[f"dllm-var engine (3 samples per prompt, {how})"] for how in ("shared prefill",
                                                                                        "every row prefilled"))
    assert shared["requests"] == apart["requests"] == 6 and shared["tokens"] == apart["tokens"]  # the same samples
    cached, uncached = (rows[f"dllm-var engine (prompts seen before, prefix cache{how})"]
                        for how in (": prefill skipped", " off"))
    assert (cached["tokens"], cached["forwards"]) == (uncached["tokens"], uncached["forwards"])
    assert (cached["prefix_cache_hits"], uncached["prefix_cache_hits"]) == (2, 0)
    # 64 tokens in pages of 16: one slot of max_model_len 64; reserved, one request's 8 + 32 tokens (3 pages);
    # on demand, two prefills of 8 + 8 tokens, each with a page free to grow into, until one is preempted
    slots, reserved, on_demand, recomputed = (
        rows[f"dllm-var engine (2 requests at once, 64-token K/V pool, {how})"]
        for how in ("a slot of 64 positions per request", "paged, prompt + max_new_tokens reserved", "paged on demand",
                    "paged on demand, preempted K/V recomputed"))
    assert [r["peak_running"] for r in (slots, reserved, on_demand, recomputed)] == [1, 1, 2, 2]
    assert (reserved["preemptions"], on_demand["preemptions"], recomputed["preemptions"]) == (0, 1, 1)
    assert on_demand["swapped_bytes"] > 0 and on_demand["rebuilt_tokens"] == 0
    assert recomputed["swapped_bytes"] == 0 and recomputed["rebuilt_tokens"] >= 8  # at least its prompt
    assert (slots["tokens"], slots["forwards"]) == (reserved["tokens"], reserved["forwards"]) == \
           (on_demand["tokens"], on_demand["forwards"]) == (recomputed["tokens"], recomputed["forwards"])
    assert rows["LLaDA vanilla (gen 16, steps 16)"]["speedup_vs_vanilla"] == 1.0
    assert any(name.startswith("Fast-dLLM") for name in rows)


@pytest.mark.slow
def test_serve_bench_compares_routings_on_prompts_asked_again(tmp_path, ray_local):
    """One request at a time, so no repeat can race its first request: under prompt affinity every repeat
    finds its prompt's K/V on its replica; Serve's random choices find them at most as often."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "routing.json"
    serve_bench.main(["--routing", "--replicas", "2", "--distinct", "3", "--repeats", "3", "--prompt-len", "24",
                      "--max-tokens", "8", "--block-size", "8", "--concurrency", "1", "--d-model", "64",
                      "--layers", "1", "--port", str(port), "--json", str(out)])
    random_choice, affinity = json.loads(out.read_text())
    assert [random_choice["setting"], affinity["setting"]] == ["power_of_two c=1", "prompt_affinity c=1"]
    for row in (random_choice, affinity):
        assert row["requests"] == 9 and row["mean_tokens"] == 8  # ignore_eos: every request decodes max_tokens
    assert affinity["cached_prompt_share"] == pytest.approx(2 / 3)  # all but each prompt's first request
    assert random_choice["cached_prompt_share"] <= affinity["cached_prompt_share"]


def test_fp8_train_bench_drives_the_training_workers_deepspeed_engine(tmp_path):
    """The DeepSpeed path runs here in bf16 (FP8 needs a Hopper GPU): the same engine setup as a worker."""
    out = tmp_path / "ds.json"
    cmd = [sys.executable, "-m", "benchmarks.fp8_train_bench", "--deepspeed", "--device", "cpu", "--precisions", "bf16",
           "--layers", "1", "--d-model", "128", "--vocab", "256", "--batch", "2", "--seq-len", "32", "--steps", "3",
           "--warmup", "1", "--json", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["deepspeed"] and run["zero_stage"] == 2 and run["fp8_linears"] == 0
    assert len(run["losses"]) == 3 and all(math.isfinite(x) for x in run["losses"])

    refused = subprocess.run(cmd[:4] + ["--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "bf16 only" in refused.stderr


def test_step_overhead_bench_times_every_request_in_every_step_and_splits_model_from_engine(tmp_path):
    out = tmp_path / "steps.json"
    result = step_overhead_bench.main(["--device", "cpu", "--batches", "1", "3", "--steps", "4", "--warmup", "2",
                                       "--profile", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    one, three = result["rows"]
    assert (one["batch"], three["batch"]) == (1, 3) and one["per_request_vs_first"] == 1.0
    for row in (one, three):
        assert row["forwards"] >= row["steps"]  # every timed step ran the model
        assert math.isclose(row["model_ms_per_step"] + row["engine_ms_per_step"], row["ms_per_step"])
        assert 0 < row["model_ms_per_step"] < row["ms_per_step"]
    assert "scheduler.py" in three["profile"] and "profile" not in one  # the largest batch is profiled
    with pytest.raises(SystemExit, match="requests ran"):  # answers that end before the timed steps do
        step_overhead_bench.main(["--device", "cpu", "--batches", "2", "--steps", "8", "--warmup", "1",
                                  "--block-size", "4", "--max-new-tokens", "8"])


def test_decode_step_bench_counts_one_byte_per_fp8_weight_in_the_roofline_and_compares_fp8_with_bf16(tmp_path):
    out = tmp_path / "step.json"
    decode_step_bench.main(["--shape", "small", "--device", "cpu", "--dtype", "float32", "--contexts", "64",
                            "--block", "16", "--iters", "2", "--variants", "eager", "fp8", "--json", str(out)])
    result = json.loads(out.read_text())
    step = {r["variant"]: r for r in result["steps"] if r["name"].startswith("engine.step")}
    fp32, fp8 = step["eager blocks"], step["eager blocks, FP8 weights"]
    cfg = decode_step_bench.small_config()
    projections = cfg.n_layers * (4 * cfg.d_model ** 2 + 3 * cfg.d_model * cfg.mlp_hidden_size)  # square K/V heads
    scales = cfg.n_layers * (4 * cfg.d_model + 2 * cfg.mlp_hidden_size + cfg.d_model) * 4
    saved_s = (fp32["roofline_ms"] - fp8["roofline_ms"]) / 1e3
    assert saved_s * result["bandwidth_gbs"] * 1e9 == pytest.approx(3 * projections - scales, rel=1e-6)
    [speedup] = [r for r in result["fp8_speedup"] if r["step"].startswith("engine.step")]
    assert speedup["against"] == "eager blocks" and speedup["speedup"] == pytest.approx(fp32["ms"] / fp8["ms"])


def test_each_gpu_check_plan_fits_one_device_call():
    """A device session has 15 minutes, start included: each plan must end inside one call's 600 s, its stages'
    time limits plus the 5 s each may take to die after them."""
    script = ROOT / "benchmarks" / "gpu_check.sh"
    plans, plan = {}, None
    for line in script.read_text().splitlines():
        if line.endswith(")") and line[:-1].isalnum():
            plan = plans.setdefault(line[:-1], [])
        elif line.strip().startswith("stage ") and plan is not None:
            plan.append(int(line.split()[2]))
    assert set(plans) == {"trained", "pool", "fp8"}
    for name, limits in plans.items():
        assert limits and sum(limits) + 5 * len(limits) <= 595, (name, limits)
    refused = subprocess.run(["bash", str(script), "everything"], capture_output=True, text=True)
    assert refused.returncode == 2 and "choose trained, pool or fp8" in refused.stderr


def test_priority_bench_runs_the_same_arrivals_under_both_policies(tmp_path):
    out = tmp_path / "priority.json"
    result = priority_bench.main(["--device", "cpu", "--d-model", "32", "--layers", "1", "--heads", "2", "--vocab", "64",
                                  "--max-batch-size", "2", "--background", "4", "--urgent", "2", "--urgent-every", "3",
                                  "--max-new-tokens", "16", "--urgent-tokens", "8", "--block-size", "4",
                                  "--prompt-len", "6", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    fcfs, prio = result["rows"]
    assert (fcfs["policy"], prio["policy"]) == ("fcfs", "priority")
    background = sum(round(16 * f / 4) * 4 for f in priority_bench.LENGTH_SPREAD[:4])  # 0.5-1.5x the cap, in blocks
    assert fcfs["tokens"] == prio["tokens"] == background + 2 * 8  # the same answers: every one takes its cap
    assert fcfs["preemptions"] == 0 < prio["preemptions"]  # the urgent requests took running requests' slots
    assert prio["urgent"]["p50_steps"] < fcfs["urgent"]["p50_steps"]  # steps: exact, unlike seconds
    assert result["urgent_p50_steps_fcfs_over_priority"] == fcfs["urgent"]["p50_steps"] / prio["urgent"]["p50_steps"]


def test_streaming_bench_times_the_first_token_of_whole_blocks_and_settled_prefixes(tmp_path):
    out = tmp_path / "streaming.json"
    result = streaming_bench.main(["--device", "cpu", "--d-model", "32", "--layers", "1", "--heads", "2", "--vocab", "64",
                                   "--num-prompts", "4", "--prompt-len", "5", "--batch", "2", "--block-size", "8",
                                   "--max-new-tokens", "24", "--json", str(out)])
    assert json.loads(out.read_text()) == result  # and the answers were the same both ways (it exits otherwise)
    blocks, settled = result["rows"]["blocks"], result["rows"]["settled"]
    assert blocks["tokens"] == settled["tokens"] == 4 * 24  # a random model writes no EOS: every answer its cap
    assert blocks["chunks_per_answer"] == 3 <= settled["chunks_per_answer"]  # 24 tokens in blocks of 8
    assert settled["first_token_p50_steps"] <= blocks["first_token_p50_steps"]


def test_json_mode_bench_decodes_the_record_tasks_prompts_free_and_in_json_mode(tmp_path, json_tokenizer):
    import dllm
    from conftest import make_config
    from dllm.engine.json_mode import JsonPrefix
    from dllm.synthetic import make_samples

    ckpt = dllm.save_pretrained(dllm.build_model(make_config(json_tokenizer), seed=0), json_tokenizer, tmp_path / "m")
    held = tmp_path / "heldout.jsonl"
    held.write_text("".join(json.dumps(s) + "\n" for s in make_samples(6, seed=1, tasks=["record", "sort"])))
    out = tmp_path / "json_mode.json"
    args = ["--model", str(ckpt), "--prompts-jsonl", str(held), "--device", "cpu", "--dtype", "float32",
            "--batch", "1", "3", "--block-size", "8", "--max-new-tokens", "16", "--repeats", "2", "--json", str(out)]
    result = json_mode_bench.main(args)
    assert json.loads(out.read_text()) == result
    records = sum(s["task"] == "record" for s in make_samples(6, seed=1, tasks=["record", "sort"]))
    assert result["prompts"] == records  # only the record task's rows: the others do not answer in JSON
    for batch in ("1", "3"):
        free = result["batches"][batch]["free"]
        for mode in ("json_object", "json_schema"):
            constrained = result["batches"][batch][mode]
            assert all(JsonPrefix().feed(e["answer"].encode()) is not None for e in constrained["examples"])
            ratio = result["batches"][batch][f"{mode}_over_free"]
            assert ratio["tpf"] == pytest.approx(constrained["tpf"] / free["tpf"])
            assert ratio["tokens_per_s"] == pytest.approx(constrained["tokens_per_s"] / free["tokens_per_s"])
        assert result["batches"][batch]["json_schema"]["fit_the_schema"] >= 0
    held.write_text(json.dumps(make_samples(1, tasks=["sort"])[0]) + "\n")
    with pytest.raises(SystemExit, match="no record-task rows"):
        json_mode_bench.main(args)


def test_batch_job_bench_runs_the_job_with_each_number_of_batches_in_flight(tmp_path, ray_local):
    out = tmp_path / "batch_job.json"
    result = batch_job_bench.main(["--records", "12", "--in-flight", "1", "2", "--repeats", "1", "--batch-size", "4",
                                   "--max-batch-size", "4", "--d-model", "64", "--layers", "1", "--max-tokens", "24",
                                   "--json", str(out)])  # the replica, then the whole job on Ray
    assert json.loads(out.read_text()) == result  # and the same answers in both settings (it exits otherwise)
    one, two = result["rows"]
    assert (one["batches_in_flight"], two["batches_in_flight"]) == (1, 2)
    assert one["records"] == two["records"] == 12 and one["tokens"] == two["tokens"] > 0
    assert one["rows_per_step"] <= 4 and two["rows_per_step"] <= 4  # --max-batch-size
    assert two["steps"] <= one["steps"]  # never more: the next batch only fills slots the last one left empty
    for way in ("replica", "job"):
        assert two[f"{way}_speedup"] == pytest.approx(two[f"{way}_tokens_per_s"] / one[f"{way}_tokens_per_s"])
    with pytest.raises(SystemExit):
        batch_job_bench.main(["--in-flight", "2", "4"])  # no baseline


def test_tool_calls_bench_trains_on_chats_and_judges_each_answer_through_the_parser(tmp_path, ray_local):
    """The whole path at a tiny budget (pack with the tool-call format, train, serve with the parser, ask): every
    held-out chat judged under "auto", the call kind also under "required"; the judge reads OpenAI's messages."""
    from dllm.synthetic import WEATHER_TOOL, tool_chats

    out = tmp_path / "tools.json"
    report = tool_calls_bench.main(["--workdir", str(tmp_path / "work"), "--minutes", "0.2", "--steps", "5",
                                    "--train-samples", "150", "--heldout", "9", "--json", str(out)])
    assert json.loads(out.read_text()) == report
    kinds = report["eval"]["kinds"]
    assert sum(row["chats"] for row in kinds.values()) == 9 and "exact_required" in kinds["call"]
    assert report["train"]["samples_packed"] == report["train"]["train_chats"] <= 150 and report["train"]["steps"] <= 5
    assert report["settings"]["cut_answer"] == 0.2  # answers cut in training: the default
    leak = report["length_leak"]
    assert leak["block"] == 16 and 0 <= leak["shifted"] <= 1 and set(leak["kinds"]) == {"call", "no_tool", "text"}
    assert 0 <= report["arguments_copied"] <= 1
    again = tool_calls_bench.main(["--workdir", str(tmp_path / "work"), "--train-samples", "150", "--heldout", "9",
                                   "--checkpoint", report["checkpoint"]])  # the same model judged again, no training
    assert again["train"] is None and again["checkpoint"] == report["checkpoint"]
    assert again["length_leak"] == leak and sum(row["chats"] for row in again["eval"]["kinds"].values()) == 9
    call, refusal, text = (next(c for c in tool_chats(30, seed=5) if c["kind"] == k) for k in ("call", "no_tool", "text"))
    city = json.loads(call["messages"][1]["tool_calls"][0]["function"]["arguments"])["city"]
    right_call = {"content": None, "tool_calls": [{"function": {"name": "weather", "arguments": f'{{"city": "{city}"}}'}}]}
    assert tool_calls_bench.judge(call, right_call) == (True, True) and call["tools"] == [WEATHER_TOOL]
    assert tool_calls_bench.judge(call, {"content": None, "tool_calls": [
        {"function": {"name": "weather", "arguments": '{"city": "x"}'}}]}) == (True, False)  # the wrong city
    assert tool_calls_bench.judge(call, {"content": "sunny", "tool_calls": None}) == (False, False)
    assert tool_calls_bench.judge(refusal, {"content": refusal["messages"][1]["content"]}) == (True, True)
    assert tool_calls_bench.judge(text, right_call) == (False, False)  # a call where text is due
