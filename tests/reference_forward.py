"""A numpy forward pass of the llama architecture, from the GGUF weights, with SpecEE's
per-layer semantics for exited tokens: a token that exited after layer e has K/V in layers
0..e only, and deeper layers of later tokens do not attend to it.

Simple on purpose: float32, weights dequantized by the gguf package, teacher-forced (all
positions of a layer at once, the tokens given). It is the reference for the engine's "mask"
KV policy, and research/kv_hole_fill.py uses it to price other ways of treating the holes.
"""
from typing import Dict, Optional, Sequence

import numpy as np
from gguf import GGUFReader, quants

HOLES = ("mask", "zeros", "fill")


class LlamaReference:
    def __init__(self, path: str):
        reader = GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        assert arch == "llama", f"the reference implements the llama architecture, not {arch}"
        field = lambda key: reader.fields[f"{arch}.{key}"].contents()  # noqa: E731
        self.n_layer = field("block_count")
        self.n_head = field("attention.head_count")
        self.n_head_kv = field("attention.head_count_kv")
        self.eps = field("attention.layer_norm_rms_epsilon")
        self.rope_base = field("rope.freq_base")
        self.w = {t.name: quants.dequantize(t.data, t.tensor_type).astype(np.float32) for t in reader.tensors}
        self.lm_head = self.w.get("output.weight", self.w["token_embd.weight"])
        self.head_dim = self.w["blk.0.attn_q.weight"].shape[0] // self.n_head

    def rms_norm(self, x, weight):
        rms = np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + self.eps)
        return (x / rms).astype(np.float32) * weight

    def rope(self, x, pos):
        """llama.cpp's "normal" RoPE: rotates adjacent pairs of each head. x: [T, heads, hd]."""
        d = self.head_dim
        theta = pos[:, None] * self.rope_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        cos, sin = np.cos(theta).astype(np.float32)[:, None], np.sin(theta).astype(np.float32)[:, None]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def forward(self, tokens: Sequence[int], exit_layers: Optional[Dict[int, int]] = None,
                holes: str = "mask", first: int = 0) -> np.ndarray:
        """Logits after each token from position `first` on. exit_layers[p] = e: token p stops
        after layer e (its logits are the final norm and LM head of layer e's output). The K/V
        an exited position never wrote in deeper layers: "mask" hides them (the engine's
        semantics), "zeros" reads them as zeros, "fill" computes them from the position's state
        after its exit layer (CALM's state propagation)."""
        assert holes in HOLES, holes
        exit_layers = exit_layers or {}
        T, hd = len(tokens), self.head_dim
        pos = np.arange(T)
        last = np.array([exit_layers.get(p, self.n_layer - 1) for p in range(T)])
        kv_head = np.arange(self.n_head) // (self.n_head // self.n_head_kv)
        causal = pos[None, :] <= pos[:, None]
        h = self.w["token_embd.weight"][list(tokens)].copy()
        for il in range(self.n_layer):
            blk = f"blk.{il}."
            computed = last >= il  # exited positions keep their state and write no K/V here
            x = self.rms_norm(h, self.w[blk + "attn_norm.weight"])
            q = self.rope((x @ self.w[blk + "attn_q.weight"].T).reshape(T, self.n_head, hd), pos)
            k = self.rope((x @ self.w[blk + "attn_k.weight"].T).reshape(T, self.n_head_kv, hd), pos)
            v = (x @ self.w[blk + "attn_v.weight"].T).reshape(T, self.n_head_kv, hd)
            if holes == "zeros":
                k[~computed], v[~computed] = 0.0, 0.0
            visible = causal & computed[None, :] if holes == "mask" else causal
            q, k, v = (a.transpose(1, 0, 2) for a in (q, k[:, kv_head], v[:, kv_head]))  # [head, T, hd]
            scores = np.where(visible, q @ k.transpose(0, 2, 1) / np.sqrt(hd), -np.inf)
            p_attn = np.exp(scores - scores.max(axis=-1, keepdims=True))
            attn = ((p_attn / p_attn.sum(axis=-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(T, -1)
            out = h + attn @ self.w[blk + "attn_output.weight"].T
            x = self.rms_norm(out, self.w[blk + "ffn_norm.weight"])
            gate = x @ self.w[blk + "ffn_gate.weight"].T
            out = out + ((gate / (1 + np.exp(-gate)) * (x @ self.w[blk + "ffn_up.weight"].T))
                         @ self.w[blk + "ffn_down.weight"].T)
            h = np.where(computed[:, None], out, h)
        return self.rms_norm(h[first:], self.w["output_norm.weight"]) @ self.lm_head.T
