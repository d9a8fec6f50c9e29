"""LLaDA-architecture bidirectional transformer.

Pre-norm blocks (RMSNorm), NeoX rotary embeddings computed in fp32, SwiGLU MLP, no biases,
untied LM head, full (non-causal) attention. Parameter names mirror LLaDA's checkpoint keys
(`model.transformer.blocks.{i}.q_proj.weight`, ...) so `state_dict()` *is* the checkpoint layout.

The forward serves three callers:
- plain inference/training: `model(input_ids)` -> logits [batch, seq, vocab];
- the engine: a `CacheView` over a preallocated, paged K/V pool (`dllm.engine.kv_cache`), where the
  new tokens' K/V are written at each row's offset and the queries attend to [0, offset + new);
- iteration smoothing: `inputs_embeds` instead of ids.
`logits_index` restricts the LM head to chosen positions: with a 126k vocabulary the head must
never run over a whole prompt.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import LLaDAConfig

from .kernels import pool_attention as _pool
from .quantization import Fp8Linear, Fp8Weight, fp8_linear

try:  # flash-attn is optional and CUDA-only; SDPA is the default everywhere.
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # pragma: no cover - not installable on the CPU machines
    _flash_attn_func = None


@dataclass
class CacheView:
    """Where a batch's keys/values live in a paged K/V pool, for one forward.

    k, v:       pools [n_layers, n_pages, page_size, n_kv_heads, head_dim]
    page_table: [n_slots, pages_per_slot] int: cache position p of slot s is at page
                page_table[s, p // page_size], row p % page_size (capacity = pages_per_slot * page_size)
    slots:      [batch] slot (page-table row) of each row
    offsets:  [batch] cache position of each row's first query token; the new tokens' K/V are
              written at offsets + arange(q_len) (positions past a row's committed length are
              scratch: writing there changes nothing the engine has committed)
    window:   how many pool positions to read; given by callers that track lengths on the host
    kv_lens:  [batch] keys each row attends to, [0, kv_len); default offsets + q_lens
    q_lens:   [batch] real (unpadded) query tokens per row; default the full q_len
    """

    k: torch.Tensor
    v: torch.Tensor
    page_table: torch.Tensor
    slots: torch.Tensor
    offsets: torch.Tensor
    kv_lens: torch.Tensor | None = None
    q_lens: torch.Tensor | None = None
    window: int | None = None  # pool positions to read (>= every kv_len); saves a host sync


@dataclass
class _CacheStep:
    """Per-forward indices derived from a CacheView (shared by all layers)."""

    page_idx: torch.Tensor  # [batch, q]: the pages where the new K/V go...
    page_pos: torch.Tensor  # [batch, q]: ...and the rows in them
    key_len: int  # cache positions the SDPA path reads
    kv_lens: torch.Tensor  # [batch]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 like LLaDA, then scale in the input dtype.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [batch, seq, head_dim] in fp32 for integer positions [batch, seq]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half rotary on x [batch, seq, heads, head_dim], computed in fp32."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.to(x.dtype)


class LLaDABlock(nn.Module):
    """One pre-norm transformer block; attribute names are LLaDA's checkpoint names."""

    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)  # gate
        self.up_proj = nn.Linear(d, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, d, bias=False)  # down
        self._fused: tuple[torch.Tensor, torch.Tensor] | None = None  # see fuse_projections()

    def fuse_projections(self) -> None:
        """Keep Q/K/V in one [q+2kv, d] matrix and gate/up in one [2h, d] matrix, so inference runs two
        matmuls where it ran five. The checkpoint-named parameters become views into them: no extra
        memory, the same state_dict, and in-place loads still land in the fused matrices."""
        if any(type(getattr(self, n)) is not nn.Linear for n in ("q_proj", "k_proj", "v_proj", "ff_proj", "up_proj")):
            raise ValueError("fuse_projections needs the blocks' plain nn.Linear projections (not FP8 or swapped-in "
                             "training linears)")
        with torch.no_grad():
            qkv = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            gate_up = torch.cat([self.ff_proj.weight, self.up_proj.weight])
        d, kv, h = self.q_proj.out_features, self.k_proj.out_features, self.ff_proj.out_features
        self.q_proj.weight.data, self.k_proj.weight.data, self.v_proj.weight.data = qkv.split([d, kv, kv])
        self.ff_proj.weight.data, self.up_proj.weight.data = gate_up.split([h, h])
        self._fused = (qkv, gate_up)

    def _projection_weights(self):
        """(Q/K/V weights, gate/up weights): one fused matrix each where fuse_projections() applies and
        nothing needs gradients; the separate matrices otherwise (training, or after .to() moved the
        parameters out of the fused storage, which drops the fusion)."""
        fused = self._fused
        if fused is not None and not (fused[0].data_ptr() == self.q_proj.weight.data_ptr()
                                      and fused[1].data_ptr() == self.ff_proj.weight.data_ptr()):
            self._fused = fused = None
        if fused is not None and not torch.is_grad_enabled():
            return (fused[0],), (fused[1],)
        return (_linear(self.q_proj), _linear(self.k_proj), _linear(self.v_proj)), (_linear(self.ff_proj),
                                                                                    _linear(self.up_proj))

    def forward(self, x, cos, sin, attn_mask, layer: int, cache: CacheView | None, step: _CacheStep | None,
                attention: str, causal: bool = False, fns: "BlockFunctions | None" = None):
        fns = fns or EAGER
        w_qkv, w_gate_up = self._projection_weights()
        heads = (self.n_heads, self.n_kv_heads, self.head_dim)
        if cache is None:
            q, k, v = fns.attention_inputs(x, cos, sin, self.attn_norm.weight, w_qkv, self.attn_norm.eps, *heads)
        else:
            # Write the new K/V into the pool, then attend over the row's part of the pool.
            q = fns.attention_inputs_to_pool(x, cos, sin, self.attn_norm.weight, w_qkv, self.attn_norm.eps, *heads,
                                             cache.k[layer], cache.v[layer], step.page_idx, step.page_pos)
            if attention == "pool_kernel":
                attn = _pool.pool_attention(q, cache.k[layer], cache.v[layer], cache.page_table, cache.slots,
                                            step.kv_lens)
                return self._output(x, attn, w_gate_up, fns)
            k, v = (_gather_pages(pool[layer], cache.page_table, cache.slots, step.key_len).to(q.dtype)
                    for pool in (cache.k, cache.v))
        if attention == "flash" and attn_mask is None:
            attn = _flash_attn_func(q, k, v, causal=causal)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            attn = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads)
            attn = attn.transpose(1, 2)
        return self._output(x, attn, w_gate_up, fns)

    def _output(self, x, attn, w_gate_up, fns: "BlockFunctions"):
        return fns.block_output(x, attn, _linear(self.attn_out), self.ff_norm.weight, w_gate_up,
                                _linear(self.ff_out), self.ff_norm.eps)


def _gather_pages(pool: torch.Tensor, page_table: torch.Tensor, slots: torch.Tensor, length: int) -> torch.Tensor:
    """Positions [0, length) of each row's slot, dense: pool [n_pages, page_size, H, hd] -> [batch, length, H, hd]."""
    page_size = pool.shape[1]
    pages = page_table[slots, :math.ceil(length / page_size)].long()  # [batch, pages]
    dense = pool[pages]  # [batch, pages, page_size, H, hd]
    return dense.flatten(1, 2)[:, :length]


def _linear(module: nn.Module):
    """What a block function multiplies by: a plain Linear's weight (so one compiled function serves
    every layer), an FP8 layer's tensors (Fp8Weight, likewise), or the module itself where a training
    recipe swapped in its own linear (torchao's Float8Linear for FP8 training: its forward must run,
    not a matmul with its weight)."""
    if type(module) is nn.Linear:
        return module.weight
    return module.packed if isinstance(module, Fp8Linear) else module


def _apply(h, w):
    if isinstance(w, torch.Tensor):
        return F.linear(h, w)
    return fp8_linear(h, *w) if isinstance(w, Fp8Weight) else w(h)


def _in_features(w) -> int:
    return (w if isinstance(w, torch.Tensor) else w.weight).shape[1]


def _project(h, weights, sizes):
    """h @ each output matrix: one matmul split by `sizes` for a fused matrix, else one per matrix
    (each a weight, or a module: see _linear)."""
    if len(weights) == 1:
        return _apply(h, weights[0]).split(sizes, dim=-1)
    return [_apply(h, w) for w in weights]


def attention_inputs(x, cos, sin, norm_w, w_qkv, eps: float, n_heads: int, n_kv_heads: int, head_dim: int):
    """Pre-norm, Q/K/V projections and rotary: x [b, q, d] -> q [b, q, H, hd], k and v [b, q, Hkv, hd].
    w_qkv: (wq, wk, wv), or their rows stacked in one matrix."""
    b, q_len, d = x.shape
    h = rms_norm(x, norm_w, eps)
    q, k, v = _project(h, w_qkv, (n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim))
    q = q.reshape(b, q_len, n_heads, head_dim)
    k = k.reshape(b, q_len, n_kv_heads, head_dim)
    v = v.reshape(b, q_len, n_kv_heads, head_dim)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def attention_inputs_to_pool(x, cos, sin, norm_w, w_qkv, eps: float, n_heads: int, n_kv_heads: int, head_dim: int,
                             k_pool, v_pool, page_idx, page_pos):
    """attention_inputs, with the new K/V written into one layer's pool [n_pages, page_size, Hkv, hd] at
    [page_idx, page_pos]; returns q. Compiled, the rotary kernel stores K/V straight into the pool: no
    separate scatter kernels per layer."""
    q, k, v = attention_inputs(x, cos, sin, norm_w, w_qkv, eps, n_heads, n_kv_heads, head_dim)
    k_pool[page_idx, page_pos] = k.to(k_pool.dtype)
    v_pool[page_idx, page_pos] = v.to(v_pool.dtype)
    return q


def block_output(x, attn, wo, norm_w, w_gate_up, w_down, eps: float):
    """Attention output projection and the SwiGLU MLP, both residual: x, attn [b, q, ...] -> [b, q, d].
    w_gate_up: (w_gate, w_up), or the two stacked in one matrix."""
    b, q_len, _ = x.shape
    x = x + _apply(attn.reshape(b, q_len, -1), wo)
    h = rms_norm(x, norm_w, eps)
    hidden = _in_features(w_down)
    gate, up = _project(h, w_gate_up, (hidden, hidden))
    return x + _apply(F.silu(gate) * up, w_down)


@dataclass(frozen=True)
class BlockFunctions:
    """The elementwise-heavy parts of a block. Eager, every norm, rotary and residual is several
    small kernels (~50 per layer); compiled once (shapes dynamic, weights as arguments, so all
    layers share one compiled function) they fuse into a few. Matmuls stay cuBLAS either way."""

    attention_inputs: object = attention_inputs
    attention_inputs_to_pool: object = attention_inputs_to_pool
    block_output: object = block_output


EAGER = BlockFunctions()


def compiled_block_functions() -> BlockFunctions:
    compile = functools.partial(torch.compile, dynamic=True, fullgraph=True)
    return BlockFunctions(compile(attention_inputs), compile(attention_inputs_to_pool), compile(block_output))


class _Transformer(nn.Module):
    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(cfg.embedding_size, cfg.d_model),
            "blocks": nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers)),
            "ln_f": RMSNorm(cfg.d_model, cfg.rms_norm_eps),
            "ff_out": nn.Linear(cfg.d_model, cfg.embedding_size, bias=False),
        })


class LLaDAModelLM(nn.Module):
    """The LLaDA network. `model(input_ids)` returns logits [batch, seq, embedding_size]."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.model = _Transformer(config)
        self.use_flash_attn = False  # see enable_flash_attn(); load_model turns it on where it applies
        self.use_pool_kernel = False  # see enable_pool_kernel(); the engine turns it on where it applies
        self.block_functions = EAGER  # see compile_blocks()

    # -- helpers ----------------------------------------------------------------------------

    @property
    def embedding_weight(self) -> torch.Tensor:
        return self.model.transformer["wte"].weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.transformer["wte"](input_ids)

    def enable_flash_attn(self) -> bool:
        """Use flash-attn for unmasked attention when it is installed and the model is on CUDA."""
        weight = self.embedding_weight
        self.use_flash_attn = (_flash_attn_func is not None and weight.is_cuda
                               and weight.dtype in (torch.float16, torch.bfloat16))
        return self.use_flash_attn

    def enable_pool_kernel(self) -> bool:
        """Attend to the engine's K/V pool with the Triton kernel (no gather copy, CUDA-graph safe)
        where triton runs and the head size suits it; otherwise keep gather + SDPA."""
        self.use_pool_kernel = (_pool.available(self.embedding_weight.device)
                                and _pool.supported_head_dim(self.config.head_dim))
        return self.use_pool_kernel

    def fuse_projections(self) -> None:
        """Per block, one Q/K/V matmul and one gate/up matmul at inference (see LLaDABlock.fuse_projections)."""
        for block in self.model.transformer["blocks"]:
            block.fuse_projections()

    def compile_blocks(self) -> None:
        """Fuse each block's norms, rotary and residuals with torch.compile (one compile serves every
        layer and shape). Same function, fewer kernels; worth it on GPUs, where a decode step is
        otherwise ~1,500 tiny kernels."""
        self.block_functions = compiled_block_functions()

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) linears/embeddings with output projections scaled by depth; norms = 1."""
        depth_scale = 1.0 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "ln_f" in name:
                nn.init.ones_(p)
                continue
            # Projections back into the residual stream get the depth-scaled std.
            residual_out = name.endswith("attn_out.weight") or (".blocks." in name and name.endswith("ff_out.weight"))
            with torch.no_grad():
                p.normal_(0.0, std * (depth_scale if residual_out else 1.0), generator=generator)

    # -- forward ----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: CacheView | None = None,
        logits_index: torch.Tensor | None = None,
        return_hidden: bool = False,
        causal: bool = False,
    ) -> torch.Tensor:
        """Run the network.

        input_ids:      LongTensor [batch, q] (or `inputs_embeds` [batch, q, d_model])
        positions:      rotary positions [batch, q]; default arange(q), or offsets + arange(q)
                        with a cache
        attention_mask: without a cache: [batch, q] key-padding mask (1 = real token) or a
                        boolean [batch, q, q] / [batch, 1, q, q] mask (True = may attend)
        cache:          a CacheView (see there); queries then attend to the pool
        logits_index:   LongTensor [batch, n] of query positions whose logits are wanted
        causal:         causal attention (an autoregressive twin for comparisons; not with a cache)
        Returns logits [batch, q or n, embedding_size] (fp32 math is left to the caller), or the
        final hidden states when `return_hidden`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        b, q_len, _ = x.shape
        device = x.device
        arange = torch.arange(q_len, device=device)

        step = None
        attn_mask = None
        if causal and (cache is not None or attention_mask is not None):
            raise ValueError("causal=True takes neither a cache nor an attention_mask")
        attention = "flash" if self.use_flash_attn else "sdpa"
        if cache is not None:
            offsets = cache.offsets.to(device)
            q_lens = cache.q_lens if cache.q_lens is not None else torch.full((b,), q_len, device=device)
            kv_lens = cache.kv_lens if cache.kv_lens is not None else offsets + q_lens
            page_size = cache.k.shape[2]
            capacity = cache.page_table.shape[1] * page_size
            if cache.window is not None:
                key_len = cache.window
            else:
                key_len = max(int(kv_lens.max().item()), int((offsets + q_len).max().item()))
            if key_len > capacity:
                raise ValueError(f"cache window of {key_len} tokens exceeds the slot capacity {capacity}")
            if positions is None:
                positions = offsets[:, None] + arange[None, :]
            pos_idx = offsets[:, None] + arange[None, :]
            # Where the new K/V go, once per forward for every layer (kv_lens as int32: the kernel reads it).
            page_idx = cache.page_table[cache.slots[:, None], pos_idx // page_size].long()
            step = _CacheStep(page_idx, pos_idx % page_size, key_len, kv_lens.to(torch.int32))
            if self.use_pool_kernel:
                attention = "pool_kernel"  # reads the pool by slot and kv_len: no mask, no gather
            else:
                keys = torch.arange(key_len, device=device)
                attn_mask = (keys[None, :] < kv_lens[:, None])[:, None, None, :]
        else:
            if positions is None:
                positions = arange[None, :].expand(b, q_len)
            if attention_mask is not None:
                if attention_mask.dim() == 2:
                    attn_mask = attention_mask.bool()[:, None, None, :]
                elif attention_mask.dim() == 3:
                    attn_mask = attention_mask.bool()[:, None]
                else:
                    attn_mask = attention_mask.bool()
        cos, sin = rotary_cos_sin(positions, self.config.head_dim, self.config.rope_theta)

        for i, block in enumerate(self.model.transformer["blocks"]):
            x = block(x, cos, sin, attn_mask, i, cache, step, attention, causal, self.block_functions)
        if logits_index is not None:
            x = torch.gather(x, 1, logits_index[..., None].expand(-1, -1, x.shape[-1]))
        x = self.model.transformer["ln_f"](x)
        if return_hidden:
            return x
        return self.model.transformer["ff_out"](x)


def build_model(config: LLaDAConfig, *, device="cpu", dtype=torch.float32, seed: int | None = 0) -> LLaDAModelLM:
    """A freshly initialised model (for training from scratch, tests and demos)."""
    with torch.device("meta"):  # no throw-away init: an 8B model is built on the GPU directly
        model = LLaDAModelLM(config)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        model.init_weights(generator=gen)
    return model.to(dtype=dtype)
