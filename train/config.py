"""One validated configuration for an SFT run (YAML in, dataclass out; unknown keys are errors)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dllm.objective import LOSS_WEIGHTINGS

from .schedule import LR_SCHEDULES

PRECISIONS = ("bf16", "fp32")
OBJECTIVES = ("dllm-var", "trajectory")


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    """Every knob of a dLLM-Var SFT run.

    Model: `model` (a checkpoint directory, e.g. LLaDA-8B-Base) or `model_config` (LLaDAConfig
    fields for a fresh model; vocabulary and special ids come from `tokenizer`).
    Data: `data` is the packed parquet directory written by `pipelines.pack` (objective "dllm-var"),
    or the trajectories written by `pipelines.trajectories` (objective "trajectory": trajectory
    compression, each row a compressed transition s_i -> s_j of a recorded block; see dllm.trajectory).
    Steps: `max_steps` optimizer steps, or `epochs` passes over the data (one of the two).
    Rate: `warmup_steps` linear warm-up, then `lr_schedule` (see train.schedule); a cosine decay
    spans the whole budget, which `time_limit_s` ends early when it runs out first.
    Batch: each optimizer step sees num_workers * micro_batch_size * grad_accum rows.
    Validation: `eval_data` (held-out rows in the format of `data`) is scored at every checkpoint and
    at the end, or every `eval_every` steps and at the end: `eval_loss`, the masked cross-entropy on
    noise that is the same at every evaluation (and in every run with the same micro_batch_size).
    """

    run_name: str
    data: str
    eval_data: str | None = None
    eval_every: int | None = None  # steps between evaluations (default: with the checkpoints)
    model: str | None = None
    model_config: dict[str, Any] | None = None
    tokenizer: str | None = None
    storage_path: str = "runs"
    seq_len: int | None = None  # checked against the data when given
    micro_batch_size: int = 2
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: int | None = None
    lr: float = 1e-5
    warmup_steps: int = 50
    lr_schedule: str = "cosine"  # after the warm-up: "constant", or "cosine" decay to lr * min_lr_ratio at the budget's end
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    precision: str = "bf16"
    fp8: bool = False
    zero_stage: int = 2
    t_min: float = 0.1
    t_max: float = 0.9
    loss_weighting: str = "mean"
    objective: str = "dllm-var"
    tail_mask_prob: float = 0.0
    tail_eos: bool = False  # tail positions are trained to predict EOS instead of carrying no loss
    document_mask: bool = False
    pad_eos_weight: float = 1.0  # loss weight of EOS padding (terminals after an answer's first; pack --eos-pad)
    # Rows in which each answer is seen only up to a random cut (dllm.noise_batch): a block of an answer that goes on
    # past it, the inference state that the document mask otherwise never shows (the run of masks gives the length)
    cut_answer_prob: float = 0.0
    seed: int = 0
    # Rows each epoch's micro-batches are drawn from at random (Ray Data's local shuffle buffer), the same draw on
    # every worker (each takes its slice of a batch), seeded by seed and epoch so that a resumed run replays it;
    # 0: the rows in the order the packing job wrote them (concat packing's are the input's order; no_split's
    # best-fit rows come grouped by length, which a model trained in that order forgets across)
    shuffle_buffer_rows: int = 0
    materialize_data: bool = True  # read the packed rows once into the object store (False: stream each epoch)
    time_limit_s: float | None = None  # stop (with a final checkpoint) once training has run this long
    max_failures: int = 0
    log_every: int = 10
    fail_at_step: int | None = None  # test hook: one worker dies once at this step
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into checkpoints

    def __post_init__(self) -> None:
        def bad(name, allowed):
            raise ConfigError(f"train config: {name}={getattr(self, name)!r} is invalid; expected {allowed}")

        if (self.model is None) == (self.model_config is None):
            raise ConfigError("train config: give exactly one of 'model' (checkpoint dir) or 'model_config' (fresh model)")
        if self.model_config is not None and self.tokenizer is None:
            raise ConfigError("train config: a fresh model ('model_config') needs 'tokenizer' (a tokenizer directory)")
        if (self.max_steps is None) == (self.epochs is None):
            raise ConfigError("train config: give exactly one of 'max_steps' or 'epochs'")
        for name in ("micro_batch_size", "grad_accum", "num_workers", "checkpoint_every", "keep_checkpoints",
                     "cpus_per_worker", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        for name in ("max_steps", "epochs", "eval_every"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                bad(name, "an integer >= 1")
        if self.eval_every is not None and self.eval_data is None:
            raise ConfigError("train config: eval_every needs eval_data (held-out rows in the format of 'data')")
        if self.precision not in PRECISIONS:
            bad("precision", f"one of {list(PRECISIONS)}")
        if self.objective not in OBJECTIVES:
            bad("objective", f"one of {list(OBJECTIVES)}")
        if self.lr_schedule not in LR_SCHEDULES:
            bad("lr_schedule", f"one of {list(LR_SCHEDULES)}")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "a fraction in [0, 1]")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            bad("loss_weighting", f"one of {list(LOSS_WEIGHTINGS)}")
        if self.zero_stage not in (0, 1, 2):
            bad("zero_stage", "0, 1 or 2")
        if not 0 <= self.t_min <= self.t_max <= 1:
            raise ConfigError(f"train config: need 0 <= t_min <= t_max <= 1, got {self.t_min}, {self.t_max}")
        if not 0 <= self.tail_mask_prob <= 1:
            bad("tail_mask_prob", "a fraction in [0, 1]")
        if not 0 <= self.pad_eos_weight <= 1:
            bad("pad_eos_weight", "a weight in [0, 1]")
        if not 0 <= self.cut_answer_prob <= 1:
            bad("cut_answer_prob", "a fraction in [0, 1]")
        if not isinstance(self.shuffle_buffer_rows, int) or self.shuffle_buffer_rows < 0:
            bad("shuffle_buffer_rows", "an integer >= 0 (0 = no shuffling)")
        if self.tail_eos and self.tail_mask_prob == 0:
            raise ConfigError("train config: tail_eos needs tail_mask_prob > 0 (it changes what tail positions learn)")
        if self.lr <= 0 or self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("train config: lr must be > 0 and warmup_steps, weight_decay, grad_clip >= 0")
        self.betas = tuple(self.betas)
        if self.fp8 and not self.use_gpu:
            raise ConfigError("train config: fp8 needs use_gpu: true (FP8 linears run on Hopper-class GPUs only)")

    @property
    def tokenizer_dir(self) -> str:
        return self.tokenizer or self.model

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        if not isinstance(raw, dict):
            raise ConfigError("train config must be a mapping of keys to values")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ConfigError(f"train config: unknown key(s) {unknown}; allowed keys: {sorted(names)}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in raw]
        if missing:
            raise ConfigError(f"train config: missing required key(s) {missing}")
        try:
            return cls(**raw)
        except TypeError as e:
            raise ConfigError(f"train config: {e}") from e

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"train config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"train config {path} is not valid YAML: {e}") from e
        return cls.from_dict({**raw, **(overrides or {})})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d
