"""The EAGLE-1 draft head in torch: the twin of native/head.cpp, for training and for checking it.

Row j reads the target's normed final hidden state f_j and the embedding of token j+1, and
predicts f_{j+1}; the target's LM-head rows of the draft vocabulary turn the prediction into
logits for token j+2. One decoder layer without input norm (EAGLE-1), RoPE as GPT-NeoX.
"""
from typing import Dict, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .predictor_file import HeadWeights

# file tensor name -> module parameter
PARAMETERS = {"fc.weight": "fc.weight", "fc.bias": "fc.bias", "attn_q.weight": "q.weight", "attn_k.weight": "k.weight",
              "attn_v.weight": "v.weight", "attn_output.weight": "o.weight", "ffn_norm.weight": "ffn_norm",
              "ffn_gate.weight": "gate.weight", "ffn_up.weight": "up.weight", "ffn_down.weight": "down.weight"}


def rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """x [B, heads, T, hd] at positions 0..T-1, halves rotated (ggml's GGML_ROPE_TYPE_NEOX)."""
    hd = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.arange(x.shape[2], dtype=torch.float32)[:, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class DraftHeadModel(nn.Module):
    def __init__(self, n_embd: int, n_head: int, n_head_kv: int, head_dim: int, n_ff: int, rope_freq_base: float,
                 norm_eps: float, lm_rows: np.ndarray):
        super().__init__()
        self.shape = dict(n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, n_ff=n_ff,
                          rope_freq_base=rope_freq_base, norm_eps=norm_eps)
        self.fc = nn.Linear(2 * n_embd, n_embd)
        self.q = nn.Linear(n_embd, n_head * head_dim, bias=False)
        self.k = nn.Linear(n_embd, n_head_kv * head_dim, bias=False)
        self.v = nn.Linear(n_embd, n_head_kv * head_dim, bias=False)
        self.o = nn.Linear(n_head * head_dim, n_embd, bias=False)
        self.ffn_norm = nn.Parameter(torch.ones(n_embd))
        self.gate = nn.Linear(n_embd, n_ff, bias=False)
        self.up = nn.Linear(n_embd, n_ff, bias=False)
        self.down = nn.Linear(n_ff, n_embd, bias=False)
        self.register_buffer("lm_rows", torch.as_tensor(lm_rows, dtype=torch.float32))  # frozen: the target's

    def forward(self, embd: torch.Tensor, feat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """embd, feat [B, T, d] (rows from position 0) -> predicted features [B, T, d], logits [B, T, N]."""
        s = self.shape
        B, T, _ = feat.shape
        x = self.fc(torch.cat([embd, feat], dim=-1))
        q = rope(self.q(x).view(B, T, s["n_head"], s["head_dim"]).transpose(1, 2), s["rope_freq_base"])
        k = rope(self.k(x).view(B, T, s["n_head_kv"], s["head_dim"]).transpose(1, 2), s["rope_freq_base"])
        v = self.v(x).view(B, T, s["n_head_kv"], s["head_dim"]).transpose(1, 2)
        group = s["n_head"] // s["n_head_kv"]  # query head h reads K/V head h // group, as ggml broadcasts
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attn.transpose(1, 2).reshape(B, T, -1))
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + s["norm_eps"]) * self.ffn_norm
        x = x + self.down(F.silu(self.gate(n)) * self.up(n))
        return x, x @ self.lm_rows.T

    def to_weights(self, vocab: np.ndarray, tensor_type: str, top_k_hit_rate: float) -> HeadWeights:
        params = dict(self.named_parameters())
        tensors = {name: params[p].detach().numpy().astype(np.float32).copy() for name, p in PARAMETERS.items()}
        return HeadWeights(**self.shape, vocab=np.asarray(vocab, np.int32), tensors=tensors,
                           tensor_type=tensor_type, top_k_hit_rate=top_k_hit_rate)

    @staticmethod
    def from_weights(head: HeadWeights, lm_rows: np.ndarray) -> "DraftHeadModel":
        model = DraftHeadModel(lm_rows.shape[1], head.n_head, head.n_head_kv, head.head_dim, head.n_ff,
                               head.rope_freq_base, head.norm_eps, lm_rows)
        params: Dict[str, nn.Parameter] = dict(model.named_parameters())
        with torch.no_grad():
            for name, p in PARAMETERS.items():
                params[p].copy_(torch.tensor(head.tensors[name]))
        return model
