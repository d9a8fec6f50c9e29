"""Model configuration in LLaDA's `config.json` vocabulary.

The field names are LLaDA's own (`d_model`, `n_layers`, `mlp_hidden_size`, ...) so a real
LLaDA-8B / dLLM-Var `config.json` loads as is and what we save loads wherever LLaDA loads.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# LLaDA-8B token ids (used as defaults; small models carry their own in config.json).
LLADA_BOS_ID = 126080
LLADA_EOS_ID = 126081
LLADA_MASK_ID = 126336
LLADA_EOT_ID = 126348

# Config keys LLaDA writes whose value we support only in one setting. A checkpoint that asks for
# anything else describes a different network, so loading must fail rather than guess.
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "activation_type": ("silu", "swiglu"),
    "block_type": ("llama", "sequential"),
    "layer_norm_type": ("rms", "default"),
    "alibi": (False,),
    "rope": (True,),
    "weight_tying": (False,),
    "include_bias": (False,),
    "include_qkv_bias": (False,),
    "bias_for_layer_norm": (False, None),
    "multi_query_attention": (False, None),
    "scale_logits": (False,),
    "input_emb_norm": (False,),
    "clip_qkv": (None,),
}

@dataclass
class LLaDAConfig:
    """Shape and special tokens of a LLaDA-architecture model.

    Defaults are LLaDA-8B's. `embedding_size` (rows of the embedding and of the LM head) may
    exceed `vocab_size`; logits have `embedding_size` columns, as in LLaDA.
    """

    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: int | None = 126464
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    mask_token_id: int = LLADA_MASK_ID
    eos_token_id: int = LLADA_EOS_ID
    eot_token_id: int | None = LLADA_EOT_ID
    bos_token_id: int | None = LLADA_BOS_ID
    pad_token_id: int | None = LLADA_EOS_ID

    def __post_init__(self) -> None:
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"config.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"config.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head dim d_model/n_heads = {self.head_dim} must be even for rotary embeddings")
        if self.embedding_size < self.vocab_size:
            raise ValueError(
                f"config.embedding_size ({self.embedding_size}) must be >= vocab_size ({self.vocab_size})")
        for name in ("mask_token_id", "eos_token_id", "eot_token_id", "bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.embedding_size:
                raise ValueError(f"config.{name} = {value} is outside the embedding table [0, {self.embedding_size})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Tokens that end a response: EOS, and EOT when the vocabulary has one."""
        return tuple(t for t in (self.eos_token_id, self.eot_token_id) if t is not None)

    def check_token_ids(self, ids, what: str) -> list[int]:
        """`ids` as a list of ints, or a ValueError naming those outside the embedding table."""
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < self.embedding_size]
        if bad:
            raise ValueError(f"{what} token ids {bad[:5]} are outside the vocabulary [0, {self.embedding_size})")
        return ids

    def num_parameters(self) -> int:
        d, f, v = self.d_model, self.mlp_hidden_size, self.embedding_size
        kv = self.n_kv_heads * self.head_dim
        per_layer = 2 * d + d * d * 2 + 2 * d * kv + 3 * d * f
        return 2 * v * d + d + self.n_layers * per_layer

    # ----- LLaDA config.json <-> dataclass -----------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LLaDAConfig":
        """Read a LLaDA `config.json` dict; a value for an architecture we do not implement is an error."""
        for key, allowed in _REQUIRED_VALUES.items():
            if key in raw and raw[key] not in allowed:
                raise ValueError(
                    f"config.json: unsupported value {key}={raw[key]!r}; this implementation supports "
                    f"{key} in {list(allowed)} (LLaDA-8B's architecture)")
        if raw.get("mlp_hidden_size") is None and raw.get("mlp_ratio") is not None and "d_model" in raw:
            raw = {**raw, "mlp_hidden_size": int(raw["mlp_ratio"]) * int(raw["d_model"])}
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        if raw.get("n_kv_heads") is None:
            kwargs["n_kv_heads"] = raw.get("n_heads", cls.n_heads)
        missing = [k for k in ("d_model", "n_layers", "n_heads", "vocab_size") if k not in raw]
        if missing:
            raise ValueError(f"config.json is missing required key(s) {missing}")
        # LLaDA's config.json has no EOT/BOS ids; LLaDA's own apply when the vocabulary holds them.
        size = raw.get("embedding_size") or raw["vocab_size"]
        for key, default in (("eot_token_id", LLADA_EOT_ID), ("bos_token_id", LLADA_BOS_ID)):
            if key not in raw:
                kwargs[key] = default if default < size else None
        if isinstance(kwargs.get("eos_token_id"), list):  # HF allows a list; the first is the EOS.
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A LLaDA-compatible `config.json` (keys LLaDA's own modeling code reads)."""
        out = dataclasses.asdict(self)
        out.update({
            "architectures": ["LLaDAModelLM"],
            "model_type": "llada",
            "activation_type": "silu",
            "block_type": "llama",
            "layer_norm_type": "rms",
            "rope": True,
            "rope_full_precision": True,
            "alibi": False,
            "weight_tying": False,
            "include_bias": False,
            "include_qkv_bias": False,
            "scale_logits": False,
            "flash_attention": False,
            "use_cache": False,
            "mlp_ratio": max(1, self.mlp_hidden_size // self.d_model),
        })
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> "LLaDAConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"missing model config: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(raw)


def tiny_config(vocab_size: int, **overrides: Any) -> LLaDAConfig:
    """A small LLaDA-shaped config for tests and demos (special ids must be given by the caller)."""
    base = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=128,
                vocab_size=vocab_size, embedding_size=vocab_size, max_sequence_length=1024,
                rope_theta=10000.0)
    base.update(overrides)
    return LLaDAConfig(**base)
