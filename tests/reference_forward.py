"""A numpy forward pass of the llama architecture, from the GGUF weights, with SpecEE's
per-layer semantics for exited tokens: a token that exited after layer e has K/V in layers
0..e only, and deeper layers of later tokens do not attend to it.

Slow and simple on purpose: one token at a time, float32, weights dequantized by the gguf
package. It is the reference for the engine's "mask" KV policy.
"""
from typing import Dict, Optional, Sequence

import numpy as np
from gguf import GGUFReader, quants


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
        return x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + self.eps).astype(np.float32) * weight

    def rope(self, x, pos):
        """llama.cpp's "normal" RoPE: rotates adjacent pairs of each head."""
        d = self.head_dim
        theta = pos * self.rope_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def forward(self, tokens: Sequence[int], exit_layers: Optional[Dict[int, int]] = None,
                mask_holes: bool = True) -> np.ndarray:
        """Logits after each token. exit_layers[p] = e: token p stops after layer e (its logits are
        the final norm and LM head of layer e's output). mask_holes=False instead lets deeper
        layers read the K/V that an exited position never wrote, as zeros (for comparison)."""
        exit_layers = exit_layers or {}
        hd, group = self.head_dim, self.n_head // self.n_head_kv
        keys = [dict() for _ in range(self.n_layer)]    # layer -> {pos: [n_head_kv, hd]}
        values = [dict() for _ in range(self.n_layer)]
        logits = []
        for pos, token in enumerate(tokens):
            h = self.w["token_embd.weight"][token].copy()
            last = exit_layers.get(pos, self.n_layer - 1)
            for il in range(last + 1):
                blk = f"blk.{il}."
                x = self.rms_norm(h, self.w[blk + "attn_norm.weight"])
                q = self.rope((self.w[blk + "attn_q.weight"] @ x).reshape(self.n_head, hd), pos)
                keys[il][pos] = self.rope((self.w[blk + "attn_k.weight"] @ x).reshape(self.n_head_kv, hd), pos)
                values[il][pos] = (self.w[blk + "attn_v.weight"] @ x).reshape(self.n_head_kv, hd)
                visible = [p for p in range(pos + 1) if p in keys[il] or not mask_holes]
                zero = np.zeros((self.n_head_kv, hd), np.float32)
                k = np.stack([keys[il].get(p, zero) for p in visible])    # [n_vis, n_head_kv, hd]
                v = np.stack([values[il].get(p, zero) for p in visible])
                attn = np.empty((self.n_head, hd), np.float32)
                for head in range(self.n_head):
                    scores = k[:, head // group] @ q[head] / np.sqrt(hd)
                    p_attn = np.exp(scores - scores.max())
                    attn[head] = (p_attn / p_attn.sum()) @ v[:, head // group]
                h = h + self.w[blk + "attn_output.weight"] @ attn.reshape(-1)
                x = self.rms_norm(h, self.w[blk + "ffn_norm.weight"])
                gate = self.w[blk + "ffn_gate.weight"] @ x
                h = h + self.w[blk + "ffn_down.weight"] @ (gate / (1 + np.exp(-gate)) * (self.w[blk + "ffn_up.weight"] @ x))
            logits.append(self.lm_head @ self.rms_norm(h, self.w["output_norm.weight"]))
        return np.stack(logits)
