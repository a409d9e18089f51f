"""Hand-built transformers whose weights contain a known induction circuit (for the circuit tests).

Residual stream of width ``E = 3V + T`` split into subspaces: current token ``[0, V)``, position
``[V, V+T)``, previous token ``[V+T, 2V+T)`` and copied token ``[2V+T, 3V+T)``.

- L0H0 (previous-token head): query ``f_p -> c·u_{p-1}``, key ``f_s -> u_s``; it attends to ``p-1``
  and writes the token it sees into the previous-token subspace.
- L1H0 (induction head, K-composition with L0H0): query ``e_t -> c·u_t``, key ``g_t -> u_t`` (reads
  the previous-token subspace), so it attends to the position whose *previous* token equals the
  current one; it writes the token it sees into the copied-token subspace, which the unembedding
  reads with gain ``GAIN``.
- L0H1 and L1H1 have zero weights (uniform causal attention, no output).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from devinterp.models import AttentionOnlyTransformer

SHARPNESS = 25.0  # attention logit of the intended key (after the 1/sqrt(d_head) scale)
GAIN = 12.0


def analytic_weights(V: int, T: int):
    """Per-layer (W_Q, W_K, W_V, W_O) of shape (2, E, dh)/(2, dh, E), plus embeddings and W_U."""
    E = 3 * V + T
    dh = E // 2
    assert dh >= max(T, V)
    tok, pos, prv, cpy = 0, V, V + T, 2 * V + T
    c = SHARPNESS * math.sqrt(dh)
    layers = []
    for _ in range(2):
        layers.append([torch.zeros(2, E, dh), torch.zeros(2, E, dh), torch.zeros(2, E, dh),
                       torch.zeros(2, dh, E)])
    WQ, WK, WV, WO = layers[0]
    for p in range(1, T):
        WQ[0, pos + p, p - 1] = c
    for s in range(T):
        WK[0, pos + s, s] = 1.0
    for t in range(V):
        WV[0, tok + t, t] = 1.0
        WO[0, t, prv + t] = 1.0
    WQ, WK, WV, WO = layers[1]
    for t in range(V):
        WQ[0, tok + t, t] = c
        WK[0, prv + t, t] = 1.0
        WV[0, tok + t, t] = 1.0
        WO[0, t, cpy + t] = 1.0
    embed = torch.zeros(V, E)
    embed[torch.arange(V), tok + torch.arange(V)] = 1.0
    pos_embed = torch.zeros(T, E)
    pos_embed[torch.arange(T), pos + torch.arange(T)] = 1.0
    W_U = torch.zeros(E, V)
    W_U[cpy + torch.arange(V), torch.arange(V)] = GAIN
    return E, dh, layers, embed, pos_embed, W_U


def sdpa_induction_model(V: int = 20, T: int = 32) -> AttentionOnlyTransformer:
    E, dh, layers, embed, pos_embed, W_U = analytic_weights(V, T)
    model = AttentionOnlyTransformer(V, 2, 2, E, T, d_head=dh, bias=False)
    with torch.no_grad():
        model.embed.weight.copy_(embed)
        model.pos_embed.copy_(pos_embed)
        model.W_U.copy_(W_U)
        for block, (WQ, WK, WV, WO) in zip(model.blocks, layers, strict=True):
            block.attn.W_Q.copy_(WQ)
            block.attn.W_K.copy_(WK)
            block.attn.W_V.copy_(WV)
            block.attn.W_O.copy_(WO)
    return model.eval()


class MHAInductionModel(nn.Module):
    """The same circuit, written with ``nn.MultiheadAttention`` (causal mask passed explicitly)."""

    def __init__(self, V: int = 20, T: int = 32):
        super().__init__()
        E, dh, layers, embed, pos_embed, W_U = analytic_weights(V, T)
        self.embed = nn.Embedding(V, E)
        self.pos_embed = nn.Parameter(pos_embed)
        self.attn = nn.ModuleList(nn.MultiheadAttention(E, 2, bias=False, batch_first=True)
                                  for _ in range(2))
        self.W_U = nn.Parameter(W_U)
        with torch.no_grad():
            self.embed.weight.copy_(embed)
            for mha, (WQ, WK, WV, WO) in zip(self.attn, layers, strict=True):
                rows = [torch.cat([W[h].T for h in range(2)]) for W in (WQ, WK, WV)]
                mha.in_proj_weight.copy_(torch.cat(rows))
                mha.out_proj.weight.copy_(torch.cat([WO[h].T for h in range(2)], dim=1))
        self.eval()

    def forward(self, tokens):
        T = tokens.shape[1]
        x = self.embed(tokens) + self.pos_embed[:T]
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        for mha in self.attn:
            out, _ = mha(x, x, x, attn_mask=mask, need_weights=False, is_causal=True)
            x = x + out
        return x @ self.W_U
