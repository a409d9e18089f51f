"""Head scores on the models researchers bring, checked against each library's own patterns.

For every family (HF GPT-2 sdpa and eager, HF Llama with grouped-query attention, HF GPT-NeoX, a
TransformerLens TransformerBridge, hand-written ``softmax(q @ k.T)``) our per-head induction and
previous-token scores must agree within 0.02 with the same scores computed here, independently,
from the patterns the library itself reports (``output_attentions=True``, ``run_with_cache``,
the model's own record), and ablating a head must change the output. HF GPT-NeoX (through HF
and through a TransformerBridge), HF Llama and the hand-written model are first trained until they grow
an induction circuit, which the tests assert from the library's own patterns, and ablating their
induction heads must hurt copying. HF GPT-2 needs 1,000 steps and a second-order language for that
(``trained_copying("gpt2")``, docs/your_model.md): its formed-model tests are ``slow``; the default
tier checks GPT-2's agreement and ablation on a briefly trained (unformed) one.
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
    trained_copying,
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


def formed(family: str):
    """NeoX and Llama: grown an induction circuit (trained_copying); GPT-2: briefly trained.

    GPT-2 grows one only after 1,000 steps (``trained_copying("gpt2")``, the slow tests below).
    """
    return trained("gpt2") if family == "gpt2" else trained_copying(family)


def assert_formed(patterns) -> np.ndarray:
    """The library's own patterns show a layer-0 previous-token head and a layer-1 induction head."""
    ind, prev = reference_scores(patterns, SEQ)
    assert ind[1].max() > 0.5 and prev[0].max() > 0.4, (ind, prev)
    return ind


def check_induction_ablation(model, ind: np.ndarray, **kwargs) -> None:
    """Ablating the layer-1 induction heads (score > 0.5) makes the repeated half harder to predict.

    All of them: a model may grow several redundant ones (tiny Llama grows four at ~0.75).
    """
    check_head_ablation(model, [(1, int(h)) for h in np.flatnonzero(ind[1] > 0.5)], **kwargs)


def check_head_ablation(model, heads, **kwargs) -> None:
    """Ablating ``heads`` raises the loss on the repeated half by more than 0.5 nats."""
    x = tokens()

    def repeat_loss():
        logits = _logits(model(x))[:, SEQ // 2:-1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, SEQ // 2 + 1:].flatten())

    with torch.no_grad():
        clean = repeat_loss()
        with capture_attention(model, ablate=heads, record=False, **kwargs):
            ablated = repeat_loss()
    assert ablated > clean + 0.5, (heads, float(clean), float(ablated))


@needs_hf
@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_hf_sdpa_scores_match_output_attentions(family):
    model = formed(family)
    assert model.config._attn_implementation == "sdpa"
    patterns = hf_patterns(model)
    check_agreement(model, patterns, "sdpa")
    check_ablation_changes_output(model)
    if family != "gpt2":
        check_induction_ablation(model, assert_formed(patterns))


@needs_hf
@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_hf_eager_scores_match_output_attentions(family):
    sdpa = formed(family)
    model = eager_twin(sdpa)
    assert sdpa.config._attn_implementation == "sdpa"
    patterns = hf_patterns(model)
    check_agreement(model, patterns, "hf-eager")
    check_ablation_changes_output(model)
    if family != "gpt2":
        check_induction_ablation(model, assert_formed(patterns))
    # the two captures see the same heads: ablation through either gives the same logits
    x = tokens()[:2]
    with torch.no_grad():
        with capture_attention(model, ablate=[(1, 2)], record=False):
            eager = model(x).logits
        with capture_attention(sdpa, ablate=[(1, 2)], record=False):
            fused = sdpa(x).logits
    torch.testing.assert_close(eager, fused, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@needs_hf
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gpt2_grows_an_induction_circuit_and_scores_match(attn):
    """HF GPT-2 on its recipe (copy data + a second-order language) grows the circuit.

    Formed on held-out repeated tokens of period 12 (the patterns GPT-2 itself reports) and of
    period 17 (outside the training periods 4..16), so a head attending at a fixed offset does not
    pass; our scores agree with ``output_attentions``; ablating the induction heads hurts copying.
    """
    sdpa = trained_copying("gpt2")
    model = sdpa if attn == "sdpa" else eager_twin(sdpa)
    assert model.config._attn_implementation == attn
    patterns = hf_patterns(model)
    check_agreement(model, patterns, "sdpa" if attn == "sdpa" else "hf-eager")
    check_ablation_changes_output(model)
    check_induction_ablation(model, assert_formed(patterns))
    at17 = induction_scores(model, vocab_size=64, seq_len=34, num_sequences=8, copying=False, seed=5)
    assert at17.induction[1].max() > 0.5, at17.induction
    # a two-layer circuit: the layer-0 previous-token heads feed it (ablating them hurts copying too)
    _, prev = reference_scores(patterns, SEQ)
    check_head_ablation(model, [(0, int(h)) for h in np.flatnonzero(prev[0] > 0.4)])


@pytest.fixture(scope="module", params=["neox", "gpt2"])
def bridge(request, tmp_path_factory):
    """A TransformerBridge around the formed NeoX, and around the (unformed) GPT-2."""
    pytest.importorskip("transformer_lens")
    return request.param, tl_bridge(formed(request.param), tmp_path_factory.mktemp("tl")).eval()


@needs_hf
@needs_tl
def test_transformer_bridge_scores_match_run_with_cache(bridge):
    family, bridge = bridge
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens())
    patterns = [cache[f"blocks.{layer}.attn.hook_pattern"] for layer in range(2)]
    check_agreement(bridge, patterns, "transformer_lens")
    check_ablation_changes_output(bridge)
    if family != "gpt2":
        check_induction_ablation(bridge, assert_formed(patterns))
    # hook_z ablation equals ablating the same head of the HF model the bridge wraps
    x = tokens()[:2]
    hf = formed(family)  # a fresh copy: booting the bridge rewraps the modules of the one it wraps
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
    ind = assert_formed(patterns)  # the model's own record says a head formed
    check_agreement(model, patterns, "modules", attention=HAND)
    check_ablation_changes_output(model, attention=HAND)
    # ablating the induction head hurts in-context copying: the repeat half gets worse
    check_induction_ablation(model, ind, attention=HAND)


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
def test_neox_grows_an_induction_head_at_a_longer_budget_and_scores_match():
    """GPT-NeoX (full rotary) on the reference recipe grows the circuit after ~1,250 steps."""
    model = trained_induction(family="neox", steps=1500)
    patterns = hf_patterns(model)
    ind, prev = reference_scores(patterns, SEQ)
    assert ind[1].max() > 0.5 and prev[0].max() > 0.4, (ind, prev)
    check_agreement(model, patterns, "sdpa")
    check_ablation_changes_output(model)
