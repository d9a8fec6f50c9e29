"""dLLM-Var SFT on Ray Train + DeepSpeed: the entry point `ray job submit` runs.

    python -m train.sft --config train.yaml [--set key=value ...]
    ray job submit --working-dir . -- python -m train.sft --config cluster/train-llada8b.yaml

Re-submitting the same `run_name` (same `storage_path`) resumes from its latest checkpoint. Each
checkpoint holds `hf/` (load with `dllm.load_model` / serve it) and `deepspeed/` (optimizer and
step state for resuming).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from dllm.trajectory import ROW_COLUMNS
from pipelines.runtime import ensure_ray

from .config import ConfigError, TrainConfig
from .loop import HF_DIR, train_loop_per_worker

REQUIRED_COLUMNS = {"dllm-var": ("input_ids", "prompt_mask", "segment_ids"), "trajectory": ROW_COLUMNS}
MAKERS = {"dllm-var": "pack the data with `python -m pipelines.pack`",
          "trajectory": "record trajectories with `python -m pipelines.trajectories`"}


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def _read_rows(ray, path: str, objective: str):
    """A parquet directory of training rows, checked for the columns the objective reads."""
    data = ray.data.read_parquet(path, file_extensions=["parquet"])
    columns = set(data.schema().names)
    missing = [c for c in REQUIRED_COLUMNS[objective] if c not in columns]
    if missing:
        raise ConfigError(f"{path} lacks column(s) {missing} for objective {objective!r}: {MAKERS[objective]} first")
    return data


def run_training(cfg: TrainConfig, address: str | None = None):
    """Build and fit the TorchTrainer; returns Ray Train's Result."""
    ray = ensure_ray(address, quiet=False)
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data = _read_rows(ray, cfg.data, cfg.objective)
    if cfg.materialize_data:
        data = data.materialize()  # each epoch then iterates blocks in memory instead of re-reading files
    datasets = {"train": data}
    if cfg.eval_data:
        datasets["eval"] = _read_rows(ray, cfg.eval_data, cfg.objective).materialize()  # read at every evaluation
        if datasets["eval"].count() == 0:
            raise ConfigError(f"eval_data {cfg.eval_data} holds no rows")
    storage = os.path.abspath(cfg.storage_path) if "://" not in cfg.storage_path else cfg.storage_path
    cfg.storage_path = storage
    # Train's print patch would echo each worker line twice on the driver (its log + the stream it tees to).
    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not cfg.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    # Only an epochs-bounded run needs the row count (for its step budget); counting runs the whole read.
    rows = data.count() if cfg.epochs is not None else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "dataset_rows": rows},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=RunConfig(name=cfg.run_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": env}),
        datasets=datasets,
        # Every worker walks the same deterministic row order and takes its own slice (exact resume).
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    return trainer.fit()


def final_model_dir(result) -> Path | None:
    if result.checkpoint is None:
        return None
    return Path(result.checkpoint.path) / HF_DIR


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m train.sft", description=__doc__,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file with TrainConfig keys (see train/config.py)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = TrainConfig.from_yaml(args.config, _parse_overrides(args.set))
        result = run_training(cfg, args.address)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.error:
        print(f"training failed: {result.error}", file=sys.stderr)
        return 1
    print(f"[train] done: {result.metrics}")
    print(f"[train] model checkpoint: {final_model_dir(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
