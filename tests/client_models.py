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
