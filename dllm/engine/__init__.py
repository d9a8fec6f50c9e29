"""The block-diffusion inference engine: request state, scheduler, K/V pool, decoders, the loop."""

from .config import CACHE_POLICIES, DECODERS, GenerationConfig
from .engine import Engine
from .kv_cache import KVCache
from .request import Generation, Phase, RequestOutput

__all__ = ["CACHE_POLICIES", "DECODERS", "Engine", "Generation", "GenerationConfig", "KVCache", "Phase", "RequestOutput"]
