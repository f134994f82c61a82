"""The EAGLE-1 draft head in torch: the twin of native/head.cpp, for training and for checking it.

Row j reads the target's normed final hidden state f_j and the embedding of token j+1, and
predicts f_{j+1}; the target's LM-head rows of the draft vocabulary turn the prediction into
logits for token j+2. One decoder layer without input norm (EAGLE-1), RoPE as GPT-NeoX.
"""
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .predictor_file import HeadWeights

# file tensor name -> module parameter
PARAMETERS = {"fc.weight": "fc.weight", "fc.bias": "fc.bias", "attn_q.weight": "q.weight", "attn_k.weight": "k.weight",
              "attn_v.weight": "v.weight", "attn_output.weight": "o.weight", "ffn_norm.weight": "ffn_norm",
              "ffn_gate.weight": "gate.weight", "ffn_up.weight": "up.weight", "ffn_down.weight": "down.weight"}


def rope(x: torch.Tensor, base: float, start: int = 0) -> torch.Tensor:
    """x [B, heads, T, hd] at positions start..start+T-1, halves rotated (ggml's GGML_ROPE_TYPE_NEOX)."""
    hd = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.arange(start, start + x.shape[2], dtype=torch.float32)[:, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def chain_attention(q, prefix_k, prefix_v, own_k, own_v, level: int, start: int) -> torch.Tensor:
    """Attention of level `level`'s queries, rows start.. (row j: chain position level+1 of the
    chain started at row j-level): the target's rows i <= j-level (level 0's keys, all rows),
    then the chain's own rows, level t's row j-level+t for t = 1..level (own_k[t-1], rows
    start..). One softmax over the prefix's scores and the `level` per-row scores."""
    B, H, W, hd = q.shape
    scale = hd ** -0.5
    rows = torch.arange(start, start + W)
    prefix = q @ prefix_k.transpose(-1, -2) * scale                     # [B, H, W, T]
    # rows j < level start no chain (nothing to attend): they see row 0 and are never trained on
    visible = torch.arange(prefix_k.shape[2])[None, :] <= torch.clamp(rows[:, None] - level, min=0)
    prefix = prefix.masked_fill(~visible, float("-inf"))
    at = [torch.clamp(rows - level + t - start, min=0) for t in range(1, level + 1)]  # window index of row j-level+t
    ks = [kt[:, :, i] for kt, i in zip(own_k, at)]
    own = torch.stack([(q * kt).sum(-1) for kt in ks], dim=-1) * scale  # [B, H, W, level]
    p = torch.softmax(torch.cat([prefix, own], dim=-1), dim=-1)
    out = p[..., :prefix_k.shape[2]] @ prefix_v
    for t, (vt, i) in enumerate(zip(own_v, at)):
        out = out + p[..., prefix_k.shape[2] + t:prefix_k.shape[2] + t + 1] * vt[:, :, i]
    return out


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
        return self.forward_chain(embd, feat, 1)[0]

    def _project(self, embd: torch.Tensor, feat: torch.Tensor, start: int = 0):
        s = self.shape
        B, T, _ = feat.shape
        x = self.fc(torch.cat([embd, feat], dim=-1))
        q = rope(self.q(x).view(B, T, s["n_head"], s["head_dim"]).transpose(1, 2), s["rope_freq_base"], start)
        k = rope(self.k(x).view(B, T, s["n_head_kv"], s["head_dim"]).transpose(1, 2), s["rope_freq_base"], start)
        v = self.v(x).view(B, T, s["n_head_kv"], s["head_dim"]).transpose(1, 2)
        group = s["n_head"] // s["n_head_kv"]  # query head h reads K/V head h // group, as ggml broadcasts
        return x, q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

    def _finish(self, x: torch.Tensor, attn: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        x = x + self.o(attn.transpose(1, 2).reshape(B, T, -1))
        n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.shape["norm_eps"]) * self.ffn_norm
        x = x + self.down(F.silu(self.gate(n)) * self.up(n))
        return x, x @ self.lm_rows.T

    def forward_chain(self, embd: torch.Tensor, feat: torch.Tensor, levels: int, start: int = 0,
                      width: Optional[int] = None, detach: bool = True) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """The head drafting chains, as decoding runs it: [(predicted features, logits)] per level
        0..levels-1, where level L's row j is chain position L+1 of a chain started at row j-L.
        Its input is its own level-(L-1) prediction of f_j (made by row j-1) and it attends to the
        rows as decoding has them then: the target's features up to row j-L, then the chain's
        own rows j-L+1..j (level t's row j-L+t). Level 0 is the plain forward (teacher forcing),
        over all rows; levels 1.. over rows start..start+width only (training's window: their
        attention costs rows x window, not rows squared), where rows j < start+L have no such
        chain (their outputs are not meaningful)."""
        T = feat.shape[1]
        width = T - start if width is None else min(width, T - start)
        x, q, k, v = self._project(embd, feat)
        prefix_k, prefix_v = k, v
        predicted, logits = self._finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))
        out = [(predicted, logits)]
        window = slice(start, start + width)
        previous = predicted[:, max(start - 1, 0):start + width - 1]  # level 0's prediction of f_j, j in the window
        own_k, own_v = [], []
        for level in range(1, levels):
            fed = previous.detach() if detach else previous
            if start == 0 or level > 1:  # the window's first row has no such prediction (not trained on)
                fed = torch.cat([feat[:, start:start + 1], fed[:, :width - 1]], dim=1)
            x, q, k, v = self._project(embd[:, window], fed, start)
            own_k.append(k)
            own_v.append(v)
            predicted, logits = self._finish(x, chain_attention(q, prefix_k, prefix_v, own_k, own_v, level, start))
            out.append((predicted, logits))
            previous = predicted
        return out

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
