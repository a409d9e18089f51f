"""Tiny models of the families researchers bring, built in the test: no hub, no downloads.

Every builder is seeded and small enough to train a few hundred steps on a CPU. ``transformers``
and ``transformer_lens`` are imported inside the builders, so tests that need them call
``pytest.importorskip`` first (or use the ``needs_hf`` / ``needs_tl`` markers below).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # never reach the hub from a test
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

needs_hf = pytest.mark.skipif(
    __import__("importlib").util.find_spec("transformers") is None,
    reason="transformers not installed (pip install devinterp-tracker[hf])",
)
needs_tl = pytest.mark.skipif(
    __import__("importlib").util.find_spec("transformer_lens") is None,
    reason="transformer-lens not installed (pip install devinterp-tracker[tl])",
)

VOCAB = 24
N_CTX = 64


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def tiny_gpt2(*, n_layers: int = 2, n_heads: int = 4, d_model: int = 32, vocab: int = VOCAB,
              n_ctx: int = N_CTX, attn: str = "sdpa", seed: int = 0):
    """HF GPT-2 (fused ``c_attn`` Conv1D), ``attn`` = ``"sdpa"`` or ``"eager"``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _seeded(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers,
                     n_head=n_heads, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn)
    return GPT2LMHeadModel(cfg)


def tiny_neox(*, n_layers: int = 2, n_heads: int = 4, d_model: int = 32, vocab: int = VOCAB,
              n_ctx: int = N_CTX, attn: str = "sdpa", seed: int = 0):
    """HF GPT-NeoX / Pythia (fused, head-interleaved ``query_key_value``, rotary)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    _seeded(seed)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers,
                        num_attention_heads=n_heads, intermediate_size=4 * d_model,
                        max_position_embeddings=n_ctx, bos_token_id=0, eos_token_id=0,
                        hidden_dropout=0.0, attention_dropout=0.0, attn_implementation=attn)
    return GPTNeoXForCausalLM(cfg)


def tiny_llama(*, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2, d_model: int = 32,
               vocab: int = VOCAB, n_ctx: int = N_CTX, attn: str = "sdpa", seed: int = 0):
    """HF Llama with grouped-query attention (``n_kv_heads`` key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _seeded(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers,
                      num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                      intermediate_size=4 * d_model, max_position_embeddings=n_ctx,
                      bos_token_id=0, eos_token_id=0, pad_token_id=None,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg)


def tl_bridge(hf_model, tmp_path):
    """A TransformerLens ``TransformerBridge`` around ``hf_model``, booted offline.

    The bridge reads the architecture from a local folder (``save_pretrained``), never the hub.
    """
    from transformer_lens.model_bridge import TransformerBridge

    folder = tmp_path / "tl_source"
    hf_model.save_pretrained(folder)
    tiny_tokenizer(hf_model.config.vocab_size).save_pretrained(folder)
    return TransformerBridge.boot_transformers(str(folder), hf_model=hf_model)


def tiny_tokenizer(vocab: int = VOCAB):
    """A word-level fast tokenizer over the tokens ``t0 .. t{vocab-1}`` (no files, no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t0",
                                   eos_token="t0", pad_token="t0")


class HandWrittenAttention(torch.nn.Module):
    """nanoGPT's ``CausalSelfAttention`` without flash: ``softmax(q @ k.T)`` written by hand.

    ``last_pattern`` keeps the pattern of the latest call (the model's own record, for tests).
    """

    def __init__(self, d_model: int, n_heads: int, n_ctx: int):
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = torch.nn.Linear(d_model, 3 * d_model)
        self.c_proj = torch.nn.Linear(d_model, d_model)
        self.attn_dropout = torch.nn.Dropout(0.0)
        self.register_buffer("bias", torch.tril(torch.ones(n_ctx, n_ctx)).view(1, 1, n_ctx, n_ctx))
        self.last_pattern = None

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / (k.size(-1) ** 0.5))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = torch.nn.functional.softmax(att, dim=-1)
        self.last_pattern = att.detach()
        att = self.attn_dropout(att)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class HandWrittenLM(torch.nn.Module):
    """A 2-layer nanoGPT-style transformer (pre-LayerNorm, learned positions, MLPs)."""

    def __init__(self, *, n_layers: int = 2, n_heads: int = 4, d_model: int = 32, vocab: int = VOCAB,
                 n_ctx: int = N_CTX, seed: int = 0):
        super().__init__()
        _seeded(seed)
        self.wte = torch.nn.Embedding(vocab, d_model)
        self.wpe = torch.nn.Embedding(n_ctx, d_model)
        self.blocks = torch.nn.ModuleList()
        for _ in range(n_layers):
            block = torch.nn.Module()
            block.ln_1 = torch.nn.LayerNorm(d_model)
            block.attn = HandWrittenAttention(d_model, n_heads, n_ctx)
            block.ln_2 = torch.nn.LayerNorm(d_model)
            block.mlp = torch.nn.Sequential(torch.nn.Linear(d_model, 4 * d_model), torch.nn.GELU(),
                                            torch.nn.Linear(4 * d_model, d_model))
            self.blocks.append(block)
        self.ln_f = torch.nn.LayerNorm(d_model)
        self.lm_head = torch.nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = x + block.attn(block.ln_1(x))
            x = x + block.mlp(block.ln_2(x))
        return self.lm_head(self.ln_f(x))


_TRAINED: dict = {}


def trained(name: str, *, steps: int = 120, lr: float = 1e-2, seq_len: int = 24, batch: int = 16):
    """A tiny model of family ``name`` trained ``steps`` steps on repeated random tokens.

    ``name``: ``gpt2``, ``neox``, ``llama`` (sdpa attention) or ``handwritten``. The weights are
    trained once per session and per setting (cached); each call returns a fresh model holding them.
    """
    from devinterp.analyses import lm_loss
    from devinterp.data import repeated_tokens

    builders = {"gpt2": tiny_gpt2, "neox": tiny_neox, "llama": tiny_llama,
                "handwritten": lambda: HandWrittenLM()}
    key = (name, steps, lr, seq_len, batch)
    model = builders[name]()
    if key not in _TRAINED:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for i in range(steps):
            loss = lm_loss(model, repeated_tokens(VOCAB, seq_len, batch, seed=10_000 + i))
            opt.zero_grad()
            loss.backward()
            opt.step()
        _TRAINED[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(_TRAINED[key])
    return model.eval()
