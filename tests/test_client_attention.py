"""Head scores on the models researchers bring, checked against each library's own patterns.

For every family (HF GPT-2 sdpa and eager, HF Llama with grouped-query attention, HF GPT-NeoX, a
TransformerLens TransformerBridge, hand-written ``softmax(q @ k.T)``) our per-head induction and
previous-token scores must agree within 0.02 with the same scores computed here, independently,
from the patterns the library itself reports (``output_attentions=True``, ``run_with_cache``,
the model's own record), and ablating a head must change the output.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from client_models import (
    VOCAB,
    HandWrittenLM,
    needs_hf,
    needs_tl,
    tiny_gpt2,
    tl_bridge,
    trained,
    trained_induction,
)

from devinterp.analyses import ModuleAttention, capture_attention, induction_scores
from devinterp.data import repeated_tokens
from devinterp.errors import AttentionNotFoundError

SEQ, N = 24, 6


def reference_scores(patterns: list[torch.Tensor], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Induction and previous-token scores from given patterns (batch, heads, T, T), by index."""
    half = seq_len // 2
    ind, prev = [], []
    for a in patterns:
        a = a.double()
        rows = range(half, seq_len)
        ind.append(torch.stack([a[:, :, p, p - half + 1] for p in rows], -1).mean((0, -1)))
        prev.append(torch.stack([a[:, :, p, p - 1] for p in range(1, seq_len)], -1).mean((0, -1)))
    return torch.stack(ind).numpy(), torch.stack(prev).numpy()


def tokens() -> torch.Tensor:
    return repeated_tokens(VOCAB, SEQ, N, seed=0)  # what induction_scores(seed=0) draws


def check_agreement(model, patterns, source: str, **kwargs) -> None:
    scores = induction_scores(model, vocab_size=VOCAB, seq_len=SEQ, num_sequences=N, copying=True,
                              copying_sequences=2, **kwargs)
    ind, prev = reference_scores(patterns, SEQ)
    assert scores.source == source
    assert scores.heads_per_layer == (4, 4)
    np.testing.assert_allclose(scores.induction, ind, atol=0.02)
    np.testing.assert_allclose(scores.previous_token, prev, atol=0.02)
    assert np.isfinite(scores.copying).all() and np.abs(scores.copying).max() > 0


def check_ablation_changes_output(model, **kwargs) -> None:
    x = tokens()[:2]
    with torch.no_grad():
        clean = _logits(model(x))
        for layer in (0, 1):
            with capture_attention(model, ablate=[(layer, 1)], record=False, **kwargs):
                ablated = _logits(model(x))
            assert (clean - ablated).abs().max() > 1e-4, f"ablating L{layer}H1 changed nothing"
        after = _logits(model(x))
    torch.testing.assert_close(after, clean)  # hooks removed


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def eager_twin(model):
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin.eval()


def hf_patterns(model) -> list[torch.Tensor]:
    """The attention HF itself reports (``output_attentions=True`` on an eager twin)."""
    twin = eager_twin(model)
    with torch.no_grad():
        out = twin.eval()(tokens(), output_attentions=True)
    assert len(out.attentions) == 2
    return list(out.attentions)


@needs_hf
@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_hf_sdpa_scores_match_output_attentions(family):
    model = trained(family)
    assert model.config._attn_implementation == "sdpa"
    check_agreement(model, hf_patterns(model), "sdpa")
    check_ablation_changes_output(model)


@needs_hf
@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_hf_eager_scores_match_output_attentions(family):
    sdpa = trained(family)
    model = eager_twin(sdpa)
    assert sdpa.config._attn_implementation == "sdpa"
    check_agreement(model, hf_patterns(model), "hf-eager")
    check_ablation_changes_output(model)
    # the two captures see the same heads: ablation through either gives the same logits
    x = tokens()[:2]
    with torch.no_grad():
        with capture_attention(model, ablate=[(1, 2)], record=False):
            eager = model(x).logits
        with capture_attention(sdpa, ablate=[(1, 2)], record=False):
            fused = sdpa(x).logits
    torch.testing.assert_close(eager, fused, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    pytest.importorskip("transformer_lens")
    return tl_bridge(trained("gpt2"), tmp_path_factory.mktemp("tl")).eval()


@needs_hf
@needs_tl
def test_transformer_bridge_scores_match_run_with_cache(bridge):
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens())
    patterns = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(2)]
    check_agreement(bridge, patterns, "transformer_lens")
    check_ablation_changes_output(bridge)
    # hook_z ablation equals ablating the same head of the HF model the bridge wraps
    x = tokens()[:2]
    hf = trained("gpt2")
    with torch.no_grad():
        with capture_attention(bridge, ablate=[(0, 3)], record=False):
            through_tl = bridge(x)
        with capture_attention(hf, ablate=[(0, 3)], record=False):
            through_hf = hf(x).logits
    torch.testing.assert_close(through_tl, through_hf, atol=1e-4, rtol=1e-4)


HAND = ModuleAttention(pattern="blocks.*.attn.attn_dropout", head_input="blocks.*.attn.c_proj")


def test_hand_written_attention_through_module_adapter():
    """On hand-written attention that has grown an induction head (checked here, not assumed)."""
    model = trained("handwritten-induction")
    with torch.no_grad():
        model(tokens())
    patterns = [b.attn.last_pattern for b in model.blocks]
    ind, prev = reference_scores(patterns, SEQ)  # the model's own record says a head formed
    assert ind[1].max() > 0.5 and prev[0].max() > 0.4, (ind, prev)
    check_agreement(model, patterns, "modules", attention=HAND)
    check_ablation_changes_output(model, attention=HAND)
    # ablating the induction head hurts in-context copying: the repeat half gets worse
    x = tokens()
    head = int(np.argmax(ind[1]))
    with torch.no_grad():
        clean = torch.nn.functional.cross_entropy(model(x)[:, SEQ // 2:-1].flatten(0, 1), x[:, SEQ // 2 + 1:].flatten())
        with capture_attention(model, ablate=[(1, head)], record=False, attention=HAND):
            ablated = torch.nn.functional.cross_entropy(model(x)[:, SEQ // 2:-1].flatten(0, 1),
                                                        x[:, SEQ // 2 + 1:].flatten())
    assert ablated > clean + 0.1, (float(clean), float(ablated))


def test_hand_written_pre_ln_model_through_module_adapter():
    model = trained("handwritten")  # pre-LN + MLPs: no induction head within this budget
    with torch.no_grad():
        model(tokens())
    patterns = [b.attn.last_pattern for b in model.blocks]
    check_agreement(model, patterns, "modules", attention=HAND)
    check_ablation_changes_output(model, attention=HAND)


def test_hand_written_attention_unknown_error_shows_the_adapter():
    model = HandWrittenLM(n_ctx=SEQ)
    with pytest.raises(AttentionNotFoundError) as info:
        induction_scores(model, vocab_size=VOCAB, seq_len=SEQ, num_sequences=2)
    message = str(info.value)
    assert "ModuleAttention(pattern=" in message and "head_input=" in message
    assert "attention=adapter" in message


def test_module_adapter_errors_name_the_modules():
    model = HandWrittenLM(n_ctx=SEQ)
    with pytest.raises(AttentionNotFoundError, match="blocks.0.attn"):
        induction_scores(model, vocab_size=VOCAB, seq_len=SEQ, num_sequences=2,
                         attention=ModuleAttention(pattern="nope.*"))
    with pytest.raises(AttentionNotFoundError, match="not a pattern"):
        induction_scores(model, vocab_size=VOCAB, seq_len=SEQ, num_sequences=2,
                         attention=ModuleAttention(pattern="blocks.*.attn.c_proj"))


@needs_hf
def test_lightning_style_wrapper_is_scored_through_the_inner_hf_model():
    inner = tiny_gpt2(attn="eager", seed=1).eval()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = inner

        def forward(self, x):
            return self.net(input_ids=x)  # a ModelOutput

    direct = induction_scores(inner, vocab_size=VOCAB, seq_len=SEQ, num_sequences=4, copying=False)
    wrapped = induction_scores(Wrapper(), vocab_size=VOCAB, seq_len=SEQ, num_sequences=4, copying=False)
    assert wrapped.source == "hf-eager"
    np.testing.assert_allclose(wrapped.induction, direct.induction)


@pytest.mark.slow
@needs_hf
def test_trained_llama_grows_an_induction_head_and_scores_still_match():
    """Longer training (300 steps at lr 1e-2): a layer-1 Llama head attends one past the repeat.

    On this data (period fixed at 12, as in the scoring) that head is a fixed-offset head rather
    than an induction circuit: layer 0 grows no previous-token head (max 0.12 for seed 0; seed 1
    grows neither, 0.10). The test checks that the scores still match HF's sharply peaked patterns.
    The hand-written model grows a real induction head: test_hand_written_attention_through_module_adapter.
    """
    model = trained("llama", steps=300, lr=1e-2)
    scores = induction_scores(model, vocab_size=VOCAB, seq_len=SEQ, num_sequences=16)
    layer, head, value = scores.best("induction")
    assert layer == 1 and value > 0.5, scores.induction
    assert np.isfinite(scores.copying).all()
    check_agreement(model, hf_patterns(model), "sdpa")


@pytest.mark.slow
@needs_hf
def test_neox_grows_an_induction_head_at_a_longer_budget_and_scores_match():
    """GPT-NeoX (full rotary) on the reference recipe grows the circuit after ~1,250 steps."""
    model = trained_induction(family="neox", steps=1500)
    patterns = hf_patterns(model)
    ind, prev = reference_scores(patterns, SEQ)
    assert ind[1].max() > 0.5 and prev[0].max() > 0.4, (ind, prev)
    check_agreement(model, patterns, "sdpa")
    check_ablation_changes_output(model)
