"""The block-diffusion inference engine: request state, scheduler, K/V pool, decoders, the loop."""

from .config import CACHE_POLICIES, DECODERS, MAX_LOGPROBS, GenerationConfig
from .engine import Engine
from .json_mode import RESPONSE_FORMATS
from .kv_cache import KVCache
from .request import Generation, Phase, RequestOutput, TokenLogprob
from .scheduler import PAGE_ALLOCATIONS, PREEMPTION_MODES, SCHEDULING_POLICIES

__all__ = ["CACHE_POLICIES", "DECODERS", "MAX_LOGPROBS", "PAGE_ALLOCATIONS", "PREEMPTION_MODES", "RESPONSE_FORMATS",
           "SCHEDULING_POLICIES", "Engine", "Generation", "GenerationConfig", "KVCache", "Phase", "RequestOutput", "TokenLogprob"]
