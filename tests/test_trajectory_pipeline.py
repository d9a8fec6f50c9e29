"""Trajectory compression as Ray jobs: record verified trajectories with engine actors (Ray Data), then
fine-tune on compressed transitions through the train package (Ray Train + DeepSpeed)."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dllm
from pipelines.trajectories import main as record_main
from train.config import ConfigError, TrainConfig
from train.sft import final_model_dir, run_training

pytestmark = pytest.mark.slow
CFG = dllm.GenerationConfig(block_size=8, threshold=0.9, max_new_tokens=24, early_stop=True)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, talkative_model, char_tokenizer, ray_local):
    root = tmp_path_factory.mktemp("traj")
    ckpt = dllm.save_pretrained(talkative_model, char_tokenizer, root / "ckpt")
    prompts = ["abc", "cab", "bca", "abcd", "dcba", "ba", "add", "sort"]
    answers = [g.text for g in dllm.Engine(talkative_model, char_tokenizer).generate(prompts, CFG)]
    with open(root / "samples.jsonl", "w") as f:
        for i, (p, a) in enumerate(zip(prompts, answers)):
            right = i % 2 == 0  # half the references disagree with the model: the verifier drops those
            f.write(json.dumps({"instruction": p, "input": "", "output": a if right else a + "x"}) + "\n")
    rc = record_main(["--model", str(ckpt), "--input", str(root / "samples.jsonl"), "--output", str(root / "out"),
                      "--block-size", "8", "--max-new-tokens", "24", "--batch-size", "3"])
    assert rc == 0
    return root, ckpt, prompts


def test_only_verified_trajectories_are_written(recorded):
    root, _, prompts = recorded
    stats = json.loads((root / "out" / "stats.json").read_text())
    assert stats["samples"] == len(prompts) and stats["kept"] == len(prompts) // 2
    table = pa.concat_tables([pq.read_table(str(f)) for f in sorted((root / "out").glob("*.parquet"))])
    assert table.num_rows == len(prompts) // 2
    for tokens, reveal, b in zip(table["tokens"].to_pylist(), table["reveal_step"].to_pylist(),
                                 table["block_size"].to_pylist()):
        assert b == 8 and len(tokens) == len(reveal) and len(tokens) % b == 0
        assert min(reveal) >= -1 and max(reveal) >= 0


def test_fine_tuning_on_compressed_transitions_runs_as_a_train_job(recorded, char_tokenizer):
    root, ckpt, _ = recorded
    cfg = TrainConfig(run_name="td", model=str(ckpt), data=str(root / "out"), objective="trajectory",
                      storage_path=str(root / "runs"), micro_batch_size=2, num_workers=2, precision="fp32",
                      lr=1e-3, warmup_steps=1, max_steps=4, checkpoint_every=4, log_every=2,
                      eval_data=str(root / "out"))  # scored as compressed transitions too
    result = run_training(cfg)
    model = dllm.load_model(final_model_dir(result))
    state = json.loads((final_model_dir(result) / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["samples_seen"] == 4 * 2 * 2
    rows = sum(pq.read_metadata(str(f)).num_rows for f in (root / "out").glob("*.parquet"))
    assert result.metrics["eval_rows"] == rows and math.isfinite(result.metrics["eval_loss"])
    gens = dllm.Engine(model, char_tokenizer).generate(["abc"], CFG)
    assert gens[0].finish_reason in ("stop", "length")


def test_wrong_data_for_the_objective_is_refused(recorded, tmp_path):
    root, ckpt, _ = recorded
    with pytest.raises(ConfigError, match="pipelines.pack"):
        run_training(TrainConfig(run_name="bad", model=str(ckpt), data=str(root / "out"), max_steps=1,
                                 storage_path=str(tmp_path)))
    with pytest.raises(ConfigError, match="objective"):
        TrainConfig(run_name="bad", model=str(ckpt), data="x", max_steps=1, objective="distill")
