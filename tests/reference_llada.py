"""An independent, deliberately plain LLaDA forward used as ground truth by the tests.

Written from the architecture description (not from dllm.model): float64, explicit per-head loops,
manual softmax, a concatenating K/V list as the cache. Weights come as a dict of LLaDA key names.
"""

import math

import torch


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x, positions, theta):
    # x [seq, head_dim]; NeoX: first half and second half rotate together.
    d = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(d // 2):
        freq = 1.0 / theta ** (2 * i / d)
        ang = positions.double() * freq
        a, b = x[:, i], x[:, i + d // 2]
        out[:, i] = a * torch.cos(ang) - b * torch.sin(ang)
        out[:, i + d // 2] = b * torch.cos(ang) + a * torch.sin(ang)
    return out


class ReferenceLLaDA:
    def __init__(self, weights: dict, cfg):
        self.w = {k: v.double() for k, v in weights.items()}
        self.cfg = cfg

    def layer_weights(self, i, name):
        return self.w[f"model.transformer.blocks.{i}.{name}.weight"]

    def forward(self, ids, positions=None, past=None, key_valid=None):
        """ids [seq] -> (logits [seq, V], new_kv per layer). `past` = list of (K, V) per layer,
        each [heads_kv, past_len, hd]; queries attend to past + all new tokens (bidirectional).
        key_valid: optional bool [past_len + seq] of keys that may be attended."""
        c = self.cfg
        hd = c.d_model // c.n_heads
        seq = ids.shape[0]
        past_len = 0 if past is None else past[0][0].shape[1]
        if positions is None:
            positions = torch.arange(past_len, past_len + seq)
        x = self.w["model.transformer.wte.weight"][ids]
        new_kv = []
        for i in range(c.n_layers):
            h = rms(x, self.layer_weights(i, "attn_norm"), c.rms_norm_eps)
            q = h @ self.layer_weights(i, "q_proj").T
            k = h @ self.layer_weights(i, "k_proj").T
            v = h @ self.layer_weights(i, "v_proj").T
            ks, vs, outs = [], [], []
            for kh in range(c.n_kv_heads):
                kk = rope(k[:, kh * hd:(kh + 1) * hd], positions, c.rope_theta)
                vv = v[:, kh * hd:(kh + 1) * hd]
                if past is not None:
                    kk = torch.cat([past[i][0][kh], kk])
                    vv = torch.cat([past[i][1][kh], vv])
                ks.append(kk)
                vs.append(vv)
            group = c.n_heads // c.n_kv_heads
            for qh in range(c.n_heads):
                qq = rope(q[:, qh * hd:(qh + 1) * hd], positions, c.rope_theta)
                kk, vv = ks[qh // group], vs[qh // group]
                scores = qq @ kk.T / math.sqrt(hd)
                if key_valid is not None:
                    scores = scores.masked_fill(~key_valid[None, :], float("-inf"))
                p = torch.exp(scores - scores.max(-1, keepdim=True).values)
                p = p / p.sum(-1, keepdim=True)
                outs.append(p @ vv)
            x = x + torch.cat(outs, -1) @ self.layer_weights(i, "attn_out").T
            h = rms(x, self.layer_weights(i, "ff_norm"), c.rms_norm_eps)
            gate = h @ self.layer_weights(i, "ff_proj").T
            up = h @ self.layer_weights(i, "up_proj").T
            x = x + (gate * torch.sigmoid(gate) * up) @ self.layer_weights(i, "ff_out").T
            new_kv.append((torch.stack(ks), torch.stack(vs)))
        x = rms(x, self.w["model.transformer.ln_f.weight"], c.rms_norm_eps)
        return x @ self.w["model.transformer.ff_out.weight"].T, new_kv
