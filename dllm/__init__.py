"""dllm: the core of dLLM-Var on Ray (model, checkpoints, tokenizer, objective, packing, engine).

Imports no Ray: `pipelines`, `train` and `serve` are the Ray shells around this package.
"""

from .checkpoint import CheckpointError, inference_placement, load_model, save_pretrained
from .config import LLaDAConfig, tiny_config
from .engine import Engine, Generation, GenerationConfig, RequestOutput
from .likelihood import LogLikelihood, log_likelihood
from .model import CacheView, LLaDAModelLM, build_model
from .objective import diffusion_loss, diffusion_loss_from_hidden, document_attention_mask, noise_batch
from .packing import PackedRows, eos_padded, pack_samples
from .quantization import quantize_fp8
from .tokenizer import load_tokenizer, special_ids, train_tokenizer

__all__ = [
    "build_model", "CacheView", "CheckpointError", "diffusion_loss", "diffusion_loss_from_hidden",
    "document_attention_mask", "Engine", "eos_padded", "Generation", "GenerationConfig", "inference_placement",
    "LLaDAConfig",
    "LLaDAModelLM", "load_model", "load_tokenizer", "log_likelihood", "LogLikelihood", "noise_batch",
    "pack_samples", "PackedRows", "quantize_fp8", "RequestOutput", "save_pretrained", "special_ids",
    "tiny_config", "train_tokenizer",
]
