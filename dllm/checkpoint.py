"""Hugging Face style checkpoint directories in LLaDA's layout (safetensors only, never pickle).

A directory holds `config.json`, either `model.safetensors` or shards listed in
`model.safetensors.index.json`, and the tokenizer files. Tensor names are LLaDA's
(`model.transformer.blocks.{i}.q_proj.weight`, ...), which are exactly our `state_dict()` keys.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import LLaDAConfig
from .model import LLaDAModelLM
from .quantization import is_quantized

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file or tensor."""


def _shard_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
        files = {}
        for name, shard in weight_map.items():
            shard_path = path / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{index} lists shard {shard} for {name}, but {shard_path} does not exist")
            files[name] = shard_path
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    found = sorted(p.name for p in path.glob("*"))
    if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in found):
        raise CheckpointError(
            f"{path} holds only pickle weights ({found}); convert them to safetensors: pickle files can run "
            "code and are never loaded")
    raise CheckpointError(f"no weights in {path}: expected {SINGLE_FILE} or {INDEX_FILE} (found {found})")


# The dtypes a model may be loaded in for inference (dllm serve --dtype, the Serve app's `dtype`).
INFERENCE_DTYPES = ("bfloat16", "float16", "float32")


def inference_placement(device: str | torch.device | None = None) -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype a model decodes: `device`, else CUDA where there is a GPU; bf16 on a GPU, fp32
    elsewhere (CPUs have no fast bf16 matrix products)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LLaDAModelLM:
    """Load a LLaDA / dLLM-Var checkpoint directory onto `device` in `dtype`.

    Every expected tensor must be present with the expected shape, and no unknown tensor may be
    present; otherwise a CheckpointError names the tensor.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    config = LLaDAConfig.from_file(path / CONFIG_FILE)
    with torch.device("meta"):
        model = LLaDAModelLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    files = _shard_files(path)

    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing tensor(s): {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise CheckpointError(
            f"checkpoint {path} has tensor(s) this config does not define: {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} (n_layers={config.n_layers})")

    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise CheckpointError(
                        f"tensor {name} in {file.name} has shape {list(shape)}, config.json implies {list(expected[name])}")
                state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    model.enable_flash_attn()  # on CUDA with flash-attn installed; SDPA otherwise
    return model.eval()


def save_pretrained(model: LLaDAModelLM, tokenizer, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30,
                    dtype: torch.dtype | None = None) -> Path:
    """Write `model` (and `tokenizer`, if given) as a LLaDA-layout checkpoint directory.

    Weights above `max_shard_bytes` are split into `model-0000i-of-0000n.safetensors` shards with
    an index, as LLaDA-8B ships. `dtype` converts the saved tensors (default: as they are).
    """
    if is_quantized(model):
        raise CheckpointError("this model's projections are FP8 (quantized for inference): a LLaDA checkpoint holds "
                              "the unquantized weights; save the model before quantize_fp8 / Engine(quantization=)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    for stale in list(path.glob("model*.safetensors")) + [path / INDEX_FILE]:
        stale.unlink(missing_ok=True)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_FILE), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata=metadata)
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    cfg = model.config.to_dict()
    cfg["torch_dtype"] = str(dtype or next(iter(state.values())).dtype).replace("torch.", "")
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    generation = {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
