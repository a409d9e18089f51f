"""Circuit-formation metrics: induction, previous-token, duplicate-token and copying heads; ICL score.

Scores are computed on *repeated random tokens* (:func:`devinterp.data.repeated_tokens`):
``[bos] r_0 … r_{h-1} r_0 … r_{h-1}``. Write ``A[p, s]`` for a head's attention from query position
``p`` to key position ``s``, ``o`` for the offset (1 with a BOS token, else 0) and
``R = {p : p ≥ o + h}`` for the rows of the second repeat. Then, averaged over sequences,

- **induction** = mean over ``p ∈ R`` of ``A[p, p − h + 1]``: attention to the token that *followed*
  the earlier copy of the current token (prefix matching, Olsson et al. 2022);
- **duplicate_token** = mean over ``p ∈ R`` of ``A[p, p − h]``: attention to the earlier copy itself;
- **previous_token** = mean over all ``p ≥ 1`` of ``A[p, p − 1]``;
- **copying** (behavioural) = mean over ``p ∈ R`` of ``Σ_s A[p, s] · (P(t_s | clean) − P(t_s | head
  ablated))``, where ``P(t_s | ·)`` is the model's predicted probability at position ``p`` of the
  token ``t_s`` sitting at the attended position ``s``, and "ablated" zeroes the head's output before
  the output projection. It is the probability mass the head adds to the tokens it attends to, in
  ``[−1, 1]``: ≈ 1 for an induction head that alone makes the model copy, ≈ 0 for a head whose output
  does not raise what it attends to (e.g. a previous-token head), < 0 for an anti-copying head.

Each score is an average over the rows where its pattern is *defined*, so a perfect head scores 1.
(TransformerLens' head detector divides by all rows instead, so there a perfect induction head
scores about one half on such sequences.)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from devinterp.analyses.attention_capture import attention_not_found, capture_attention
from devinterp.analyses.head_params import head_params, head_params_from_projections
from devinterp.data import repeated_tokens
from devinterp.errors import DevinterpWarning, InvalidInputError

__all__ = [
    "HeadScores",
    "check_scoring_inputs",
    "induction_scores",
    "icl_score",
    "head_params",
    "head_params_from_projections",
]

SCORE_KINDS = ("induction", "previous_token", "duplicate_token", "copying")


@dataclass(frozen=True, eq=False)
class HeadScores:
    """Per-head scores, each a numpy array ``(layers, heads)``.

    Layers with fewer heads than the widest layer are padded with NaN; ``copying`` is all NaN when
    it was not computed. Layers are numbered in call order (see
    :mod:`devinterp.analyses.attention_capture`). ``source`` names the capture that read the
    attention: ``"sdpa"``, ``"multihead_attention"``, ``"transformer_lens"``, ``"hf-eager"``, or the
    name of the adapter passed as ``attention=`` (``"modules"`` for a
    :class:`~devinterp.analyses.attention_adapters.ModuleAttention`).
    """

    induction: np.ndarray
    previous_token: np.ndarray
    duplicate_token: np.ndarray
    copying: np.ndarray
    heads_per_layer: tuple[int, ...]
    source: str = "sdpa"

    @property
    def num_layers(self) -> int:
        return len(self.heads_per_layer)

    @property
    def labels(self) -> list[list[str]]:
        """``labels[l][h] == f"L{l}H{h}"`` for every existing head."""
        return [[f"L{layer}H{h}" for h in range(n)] for layer, n in enumerate(self.heads_per_layer)]

    def get(self, kind: str) -> np.ndarray:
        if kind not in SCORE_KINDS:
            raise InvalidInputError(f"unknown score {kind!r}; choose one of {SCORE_KINDS}")
        return getattr(self, kind)

    def best(self, kind: str = "induction") -> tuple[int, int, float]:
        """``(layer, head, score)`` of the head with the highest ``kind`` score."""
        values = self.get(kind)
        if np.all(np.isnan(values)):
            raise InvalidInputError(f"no {kind} scores were computed")
        flat = int(np.nanargmax(values))
        layer, head = divmod(flat, values.shape[1])
        return layer, head, float(values[layer, head])

    def best_induction_head(self) -> tuple[int, int, float]:
        return self.best("induction")

    def best_previous_token_head(self) -> tuple[int, int, float]:
        return self.best("previous_token")

    def scalars(self) -> dict[str, float]:
        """``{"induction/L0H1": …, "previous_token/L0H1": …, …, "induction/max": …}`` (NaN skipped)."""
        out: dict[str, float] = {}
        for kind in SCORE_KINDS:
            values = self.get(kind)
            if np.all(np.isnan(values)):
                continue
            for layer, n in enumerate(self.heads_per_layer):
                for h in range(n):
                    out[f"{kind}/L{layer}H{h}"] = float(values[layer, h])
            out[f"{kind}/max"] = float(np.nanmax(values))
        return out


def _logits(output) -> Tensor:
    """Logits from a model output: a tensor, an object with ``.logits``, or a tuple (first item)."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise InvalidInputError(
        f"the model returned {type(output).__name__}; expected logits (batch, T, vocab), an object "
        "with .logits, or a tuple whose first item is the logits"
    )


def _device_of(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class _EvalMode:
    """Puts every submodule in eval mode and restores each one's flag afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag


def _check_common(vocab_size: int, seq_len: int, num_sequences: int, batch_size: int | None) -> None:
    for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len),
                        ("num_sequences", num_sequences)):
        if not isinstance(value, int) or value <= 0:
            raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
        raise InvalidInputError(f"batch_size must be a positive integer or None, got {batch_size!r}")


def _model_limits(model: nn.Module) -> tuple[int | None, int | None]:
    """``(vocabulary, context length)`` of a token model where it says so, else None each."""
    vocab = ctx = None
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
            vocab = int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else None
        except (NotImplementedError, AttributeError, TypeError):
            vocab = None
    if vocab is None:
        for name in ("embed", "wte", "tok_emb", "token_embedding", "embed_tokens", "tok_embeddings"):
            emb = getattr(model, name, None)
            if isinstance(emb, nn.Embedding):
                vocab = int(emb.num_embeddings)
                break
    for holder in (getattr(model, "config", None), getattr(model, "cfg", None), model):
        if holder is None:
            continue
        for key in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(holder, key, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0 and ctx is None:
                ctx = value
        value = getattr(holder, "vocab_size", getattr(holder, "d_vocab", None))
        if vocab is None and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            vocab = value
    return vocab, ctx


def check_scoring_inputs(model: nn.Module, *, vocab_size: int, seq_len: int, bos_token: int | None = None,
                         device: str | torch.device | None = None) -> None:
    """Check that ``model`` can be scored on repeated random tokens of this vocabulary and length.

    Called by :func:`induction_scores` first, and by ``CircuitCallback`` / ``devinterp analyze``
    before any work starts.

    Raises:
        InvalidInputError: ``vocab_size`` exceeds the model's embedding, ``seq_len`` its context,
            or the model does not take token ids at all (e.g. an MLP).

    Warns:
        DevinterpWarning: ``vocab_size`` has fewer tokens than a repeat is long, so tokens recur
            within a repeat and the induction scores are biased down.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module mapping token ids to logits, got "
                                f"{type(model).__name__}")
    vocab, ctx = _model_limits(model)
    if vocab is not None and vocab_size > vocab:
        raise InvalidInputError(
            f"vocab_size={vocab_size} is larger than the model's vocabulary ({vocab} token embeddings): "
            f"pass vocab_size <= {vocab}")
    if ctx is not None and seq_len > ctx:
        raise InvalidInputError(
            f"seq_len={seq_len} is longer than the model's context ({ctx} positions): pass seq_len <= {ctx}")
    if vocab is None:  # nothing says it takes tokens: one short probe forward, with a clear error
        probe = torch.zeros(1, min(seq_len, 2), dtype=torch.long, device=_device_of(model, device))
        try:
            with _EvalMode(model), torch.no_grad():
                model(probe)
        except InvalidInputError:
            raise
        except (IndexError, RuntimeError, TypeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise InvalidInputError(
                f"{type(model).__name__} cannot be run on token ids (batch, T) ({type(exc).__name__}: "
                f"{first}): circuit scores need a model mapping token ids to logits through attention "
                f"heads, not e.g. an MLP on float features") from exc
    has_bos = bos_token is not None
    half = (seq_len - has_bos) // 2
    if 0 < vocab_size - has_bos < half:
        warnings.warn(
            f"vocab_size={vocab_size} gives fewer distinct tokens than a repeat is long ({half} for "
            f"seq_len={seq_len}): tokens recur within a repeat, which biases the induction scores down; "
            f"use seq_len <= {2 * (vocab_size - has_bos) + has_bos}",
            DevinterpWarning, stacklevel=3)


def _pattern_sums(pattern: Tensor, offset: int, half: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-head sums over batch and rows of the induction, duplicate and previous-token entries."""
    ind = torch.diagonal(pattern, offset=-(half - 1), dim1=-2, dim2=-1)[..., offset + 1:]
    dup = torch.diagonal(pattern, offset=-half, dim1=-2, dim2=-1)[..., offset:]
    prev = torch.diagonal(pattern, offset=-1, dim1=-2, dim2=-1)
    return ind.sum(dim=(0, -1)), dup.sum(dim=(0, -1)), prev.sum(dim=(0, -1))


@torch.no_grad()
def induction_scores(
    model: nn.Module,
    *,
    vocab_size: int,
    seq_len: int = 64,
    num_sequences: int = 32,
    seed: int = 0,
    bos_token: int | None = None,
    device: str | torch.device | None = None,
    copying: bool = True,
    copying_sequences: int | None = 8,
    batch_size: int | None = None,
    attention: Any = "auto",
) -> HeadScores:
    """Score every attention head of ``model`` on repeated random tokens (see the module docstring).

    The model must map token ids ``(batch, T)`` to logits ``(batch, T, vocab)`` (or an object with
    ``.logits``). It runs in eval mode and without gradients; each module's train/eval flag is
    restored afterwards.

    Args:
        model: Any PyTorch model whose attention is supported (see
            :mod:`devinterp.analyses.attention_capture`).
        vocab_size: Tokens are drawn from ``[0, vocab_size)``.
        seq_len: Total sequence length (BOS included); each repeat has ``(seq_len - has_bos) // 2``
            tokens.
        num_sequences: Number of sequences averaged over.
        seed: Seeds the sequences.
        bos_token: Optional token put first in every sequence.
        device: Where to run (default: the device of the model's first parameter).
        copying: Also compute the behavioural copying score (one extra forward pass per head).
        copying_sequences: Number of sequences (the first ones) the copying score averages over,
            to bound its cost; ``None`` = all ``num_sequences``.
        batch_size: Sequences per forward pass (default: all at once).
        attention: How the attention is read: ``"auto"`` (from the model's type: TransformerLens,
            HuggingFace eager, else SDPA / MultiheadAttention), ``"sdpa"``, or an adapter such
            as :class:`~devinterp.analyses.attention_adapters.ModuleAttention` for attention
            written by hand. :attr:`HeadScores.source` says which was used.

    Returns:
        A :class:`HeadScores`.

    Raises:
        AttentionNotFoundError: The model ran no supported attention.
        InvalidInputError: Bad arguments, or the model output is not logits.
    """
    _check_common(vocab_size, seq_len, num_sequences, batch_size)
    check_scoring_inputs(model, vocab_size=vocab_size, seq_len=seq_len, bos_token=bos_token, device=device)
    if copying_sequences is not None and (not isinstance(copying_sequences, int) or copying_sequences <= 0):
        raise InvalidInputError(f"copying_sequences must be a positive integer or None, got {copying_sequences!r}")
    n_copy = num_sequences if copying_sequences is None else min(num_sequences, copying_sequences)
    tokens = repeated_tokens(vocab_size, seq_len, num_sequences, seed=seed, bos_token=bos_token)
    tokens = tokens.to(_device_of(model, device))
    offset = int(bos_token is not None)
    half = (seq_len - offset) // 2
    rows_r = seq_len - offset - half  # rows of the second repeat
    batch_size = batch_size or num_sequences
    sums: list[list[Tensor]] | None = None
    copy_sums: dict[tuple[int, int], float] = {}
    heads_per_layer: tuple[int, ...] = ()
    with _EvalMode(model), capture_attention(model, attention=attention) as cap:
        for start in range(0, num_sequences, batch_size):
            batch = tokens[start:start + batch_size]
            cap.record, cap.ablate = True, set()
            clean = _logits(model(batch))
            if cap.num_layers == 0 or len(cap.patterns) != cap.num_layers:
                raise attention_not_found(model, cap.source)
            patterns = cap.patterns
            if sums is None:
                heads_per_layer = tuple(info.num_heads for info in cap.layers)
                sums = [[torch.zeros(n, dtype=torch.float64) for _ in range(3)] for n in heads_per_layer]
            for layer, pattern in enumerate(patterns):
                for acc, part in zip(sums[layer], _pattern_sums(pattern, offset, half), strict=True):
                    acc += part.double().cpu()
            n = min(len(batch), n_copy - start)
            if copying and n > 0:
                _accumulate_copying(model, cap, batch[:n], clean[:n], [p[:n] for p in patterns],
                                    heads_per_layer, offset + half, copy_sums)
    nl, nh = len(heads_per_layer), max(heads_per_layer)
    arrays = {k: np.full((nl, nh), np.nan) for k in SCORE_KINDS}
    denominators = {"induction": rows_r, "duplicate_token": rows_r, "previous_token": seq_len - 1}
    for layer, n in enumerate(heads_per_layer):
        ind, dup, prev = (s.numpy() for s in sums[layer])
        arrays["induction"][layer, :n] = ind / (num_sequences * denominators["induction"])
        arrays["duplicate_token"][layer, :n] = dup / (num_sequences * denominators["duplicate_token"])
        arrays["previous_token"][layer, :n] = prev / (num_sequences * denominators["previous_token"])
    for (layer, h), total in copy_sums.items():
        arrays["copying"][layer, h] = total / (n_copy * rows_r)
    return HeadScores(heads_per_layer=heads_per_layer, source=cap.source, **arrays)


def _accumulate_copying(model, cap, batch, clean_logits, patterns, heads_per_layer, first_row,
                        copy_sums) -> None:
    T = batch.shape[1]

    def attended_probs(logits: Tensor) -> Tensor:
        probs = torch.softmax(logits[:, first_row:].float(), dim=-1)  # (B, rows, V)
        return torch.gather(probs, 2, batch[:, None, :].expand(-1, T - first_row, -1))  # (B, rows, T)

    clean = attended_probs(clean_logits)
    cap.record = False
    for layer, n in enumerate(heads_per_layer):
        weights = patterns[layer][:, :, first_row:, :T]  # (B, H, rows, T)
        for h in range(n):
            cap.ablate = {(layer, h)}
            ablated = attended_probs(_logits(model(batch)))
            delta = (weights[:, h] * (clean - ablated)).sum()
            copy_sums[(layer, h)] = copy_sums.get((layer, h), 0.0) + float(delta)
    cap.record, cap.ablate = True, set()


@torch.no_grad()
def icl_score(
    model: nn.Module,
    tokens: Tensor | None = None,
    *,
    early: int | None = None,
    late: int | None = None,
    vocab_size: int | None = None,
    seq_len: int = 64,
    num_sequences: int = 32,
    seed: int = 0,
    bos_token: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
) -> float:
    """The in-context-learning score of Olsson et al. (2022): ``loss(late) − loss(early)``.

    ``loss(t)`` is the cross-entropy of predicting token ``t`` from tokens ``< t``, averaged over
    sequences. Olsson et al. used tokens 500 and 50 of 512-token contexts; the defaults here scale
    that to the sequence length: ``early = max(1, T // 10)``, ``late = T − 1``. Negative means the
    model predicts later tokens better, i.e. it uses its context.

    Args:
        model: Maps token ids ``(batch, T)`` to logits ``(batch, T, vocab)``.
        tokens: Sequences ``(batch, T)`` to score on; if None, repeated random tokens
            (:func:`devinterp.data.repeated_tokens` with ``vocab_size``, ``seq_len``,
            ``num_sequences``, ``seed``, ``bos_token``), where ``early`` falls in the first repeat
            and ``late`` in the second.
        early: Index of the early token (>= 1).
        late: Index of the late token (> early, < T).
        batch_size: Sequences per forward pass (default: all at once).

    Returns:
        The score, in nats.
    """
    if tokens is None:
        if vocab_size is None:
            raise InvalidInputError("icl_score needs tokens, or vocab_size to draw synthetic ones")
        _check_common(vocab_size, seq_len, num_sequences, batch_size)
        tokens = repeated_tokens(vocab_size, seq_len, num_sequences, seed=seed, bos_token=bos_token)
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        raise InvalidInputError("tokens must be an integer tensor (batch, T)")
    B, T = tokens.shape
    early = max(1, T // 10) if early is None else int(early)
    late = T - 1 if late is None else int(late)
    if not 1 <= early < late < T:
        raise InvalidInputError(f"need 1 <= early < late < T={T}, got early={early}, late={late}")
    tokens = tokens.to(_device_of(model, device))
    batch_size = batch_size or B
    total_early = total_late = 0.0
    with _EvalMode(model):
        for start in range(0, B, batch_size):
            batch = tokens[start:start + batch_size, : late + 1]
            logits = _logits(model(batch)).float()
            for pos, is_late in ((early, False), (late, True)):
                loss = F.cross_entropy(logits[:, pos - 1], batch[:, pos], reduction="sum")
                if is_late:
                    total_late += float(loss)
                else:
                    total_early += float(loss)
    return (total_late - total_early) / B
