"""Synthetic token data for circuit studies (no download, deterministic given a seed).

- :func:`repeated_tokens`: random tokens repeated twice (optionally after a BOS token), the probe
  on which induction / previous-token / duplicate-token heads are scored.
- :class:`MarkovLanguage`: a random sparse bigram "language".
- :class:`SkipMarkovLanguage`: a second-order one (the next token follows the last token or the
  one before it), in which a previous-token head pays off on its own.
- :class:`InductionData`: Markov sequences in which copied spans recur, so that both n-gram
  statistics and induction lower the loss. It is a ``torch.utils.data.Dataset`` (item ``i`` is a
  pure function of ``(seed, i)``) and has a fast vectorised :meth:`InductionData.sample`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from devinterp.errors import InvalidInputError

__all__ = ["repeated_tokens", "MarkovLanguage", "SkipMarkovLanguage", "InductionData"]


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
    return value


def repeated_tokens(
    vocab_size: int,
    seq_len: int,
    num_sequences: int,
    *,
    seed: int = 0,
    bos_token: int | None = None,
) -> Tensor:
    """Random tokens repeated twice: ``[bos] r_0 … r_{h-1} r_0 … r_{h-1}``, shape ``(num_sequences, seq_len)``.

    ``h = (seq_len - has_bos) // 2``; if ``seq_len - has_bos`` is odd, the last position repeats
    ``r_0`` a third time (so every position after the first ``h`` repeats the token ``h`` places
    before it). Within a half the tokens are distinct whenever the vocabulary
    (minus the BOS token) has at least ``h`` tokens, so every token of the second half has exactly
    one earlier copy.

    Args:
        vocab_size: Token ids are drawn from ``[0, vocab_size)`` (the BOS token excluded).
        seq_len: Total length of each sequence, BOS included.
        num_sequences: Number of sequences.
        seed: Seeds a private ``torch.Generator``.
        bos_token: If given, every sequence starts with it.
    """
    _positive("vocab_size", vocab_size)
    _positive("seq_len", seq_len)
    _positive("num_sequences", num_sequences)
    has_bos = bos_token is not None
    if has_bos and not 0 <= bos_token < vocab_size:
        raise InvalidInputError(f"bos_token must be in [0, {vocab_size}), got {bos_token}")
    half = (seq_len - has_bos) // 2
    if half < 2:
        raise InvalidInputError(f"seq_len={seq_len} is too short: each repeat needs >= 2 tokens")
    pool = vocab_size - has_bos
    if pool < 2:
        raise InvalidInputError(f"vocab_size={vocab_size} leaves fewer than 2 tokens to draw from")
    gen = torch.Generator().manual_seed(int(seed))
    if pool >= half:
        first = torch.argsort(torch.rand(num_sequences, pool, generator=gen), dim=1)[:, :half]
    else:
        first = torch.randint(pool, (num_sequences, half), generator=gen)
    if has_bos:
        first = first + (first >= bos_token).long()  # skip the BOS id
    parts = [first, first]
    rest = seq_len - has_bos - 2 * half
    if rest:
        parts.append(first[:, :rest])
    out = torch.cat(parts, dim=1)
    if has_bos:
        out = torch.cat([torch.full((num_sequences, 1), bos_token, dtype=torch.long), out], dim=1)
    return out


class MarkovLanguage:
    """A random sparse bigram language: each token has ``branching`` successors with weights drawn
    from a flat Dirichlet distribution.

    Args:
        vocab_size: Number of tokens.
        branching: Successors per token (the rest have probability 0).
        seed: Seeds the transition matrix.
    """

    def __init__(self, vocab_size: int, *, branching: int = 4, seed: int = 0):
        _positive("vocab_size", vocab_size)
        _positive("branching", branching)
        if branching > vocab_size:
            raise InvalidInputError(f"branching={branching} exceeds vocab_size={vocab_size}")
        self.vocab_size, self.branching = vocab_size, branching
        gen = torch.Generator().manual_seed(int(seed))
        succ = torch.argsort(torch.rand(vocab_size, vocab_size, generator=gen), dim=1)[:, :branching]
        u = torch.rand(vocab_size, branching, generator=gen).clamp_min(1e-12)
        gamma = -u.log()  # Exp(1) = Gamma(1): normalised, a flat Dirichlet draw
        weights = gamma / gamma.sum(dim=1, keepdim=True)
        self.transition = torch.zeros(vocab_size, vocab_size).scatter_(1, succ, weights)

    def sample(self, num_sequences: int, length: int, *, generator: torch.Generator) -> Tensor:
        """``(num_sequences, length)`` token ids: a uniform first token, then Markov steps."""
        tok = torch.randint(self.vocab_size, (num_sequences,), generator=generator)
        out = [tok]
        for _ in range(length - 1):
            tok = torch.multinomial(self.transition[tok], 1, generator=generator).squeeze(1)
            out.append(tok)
        return torch.stack(out, dim=1)

    def entropy_rate(self) -> float:
        """Mean (over tokens, uniformly) entropy of the next-token distribution, in nats."""
        p = self.transition
        return float(-(p * p.clamp_min(1e-30).log()).sum(1).mean())


class SkipMarkovLanguage:
    """A random sparse second-order language: the next token depends on the last two tokens.

    Each next token is drawn, with probability ``1 - skip``, from a sparse bigram table on the last
    token, else from a second, independent sparse table on the token before it (each table a
    :class:`MarkovLanguage` with ``branching`` successors per token). Predicting well needs the
    token before the last, so a model gains from a previous-token head without any copying in the
    data: the head an induction circuit is built on (as in natural text). With ``skip=0`` it is
    a bigram language, with ``skip=1`` two interleaved bigram chains.

    Args:
        vocab_size: Number of tokens.
        branching: Successors per token in each table.
        skip: Probability that a token follows the token two places back.
        seed: Seeds both tables.
    """

    def __init__(self, vocab_size: int, *, branching: int = 4, skip: float = 0.5, seed: int = 0):
        if not 0.0 <= skip <= 1.0:
            raise InvalidInputError(f"skip must be in [0, 1], got {skip}")
        self.vocab_size, self.branching, self.skip = vocab_size, branching, skip
        self.last = MarkovLanguage(vocab_size, branching=branching, seed=2 * int(seed))
        self.before = MarkovLanguage(vocab_size, branching=branching, seed=2 * int(seed) + 1)

    def sample(self, num_sequences: int, length: int, *, generator: torch.Generator) -> Tensor:
        """``(num_sequences, length)`` token ids: two uniform tokens, then second-order steps."""
        _positive("num_sequences", num_sequences)
        _positive("length", length)
        out = [torch.randint(self.vocab_size, (num_sequences,), generator=generator) for _ in range(2)]
        while len(out) < length:
            use_before = torch.rand(num_sequences, generator=generator) < self.skip
            probs = torch.where(use_before[:, None], self.before.transition[out[-2]],
                                self.last.transition[out[-1]])
            out.append(torch.multinomial(probs, 1, generator=generator).squeeze(1))
        return torch.stack(out[:length], dim=1)


class InductionData(Dataset):
    """Markov sequences with copied spans: n-gram statistics and induction both pay off.

    Each sequence of length ``n_ctx`` is drawn from a :class:`MarkovLanguage`. With probability
    ``repeat_fraction`` it then gets repeated content, so that tokens can be predicted exactly by an
    induction head, beyond what bigram statistics give:

    - ``layout="span"``: a span of ``span_min..span_max`` tokens is copied from a random earlier
      place to a random later one (overwriting);
    - ``layout="periodic"``: the first ``k`` tokens (``k`` uniform in ``span_min..span_max``) are
      repeated to fill the sequence.

    The distance between copies varies, so a head attending at a fixed offset cannot fake
    induction.

    Args:
        vocab_size: Number of tokens.
        n_ctx: Length of each sequence.
        seed: Seeds the language and the items: item ``i`` depends only on ``(seed, i)``.
        num_sequences: ``len()`` of the dataset (for map-style loaders).
        repeat_fraction: Fraction of sequences that carry a copied span.
        span_min: Shortest copied span.
        span_max: Longest copied span (clipped to ``n_ctx // 2``).
        branching: Successors per token in the language.
        layout: ``"span"`` or ``"periodic"`` (see above).
    """

    def __init__(
        self,
        vocab_size: int,
        n_ctx: int,
        *,
        seed: int = 0,
        num_sequences: int = 10_000,
        repeat_fraction: float = 1.0,
        span_min: int = 8,
        span_max: int = 24,
        branching: int = 4,
        layout: str = "span",
    ):
        _positive("n_ctx", n_ctx)
        if layout not in ("span", "periodic"):
            raise InvalidInputError(f"layout must be 'span' or 'periodic', got {layout!r}")
        _positive("num_sequences", num_sequences)
        _positive("span_min", span_min)
        if not 0.0 <= repeat_fraction <= 1.0:
            raise InvalidInputError(f"repeat_fraction must be in [0, 1], got {repeat_fraction}")
        span_max = min(span_max, n_ctx // 2)
        if repeat_fraction > 0 and span_max < span_min:
            raise InvalidInputError(
                f"n_ctx={n_ctx} is too short for spans of >= {span_min} tokens: lower span_min "
                f"or raise n_ctx to >= {2 * span_min}"
            )
        self.vocab_size, self.n_ctx, self.seed = vocab_size, n_ctx, int(seed)
        self.num_sequences, self.repeat_fraction = num_sequences, repeat_fraction
        self.span_min, self.span_max, self.layout = span_min, span_max, layout
        self.language = MarkovLanguage(vocab_size, branching=branching, seed=seed)

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, index: int) -> Tensor:
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"index {index} out of range for {self.num_sequences} sequences")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * int(index) + 1)
        return self.sample(1, generator=gen)[0]

    def sample(self, batch_size: int, *, generator: torch.Generator) -> Tensor:
        """A fresh batch ``(batch_size, n_ctx)`` drawn with ``generator``."""
        _positive("batch_size", batch_size)
        tokens = self.language.sample(batch_size, self.n_ctx, generator=generator)
        if self.repeat_fraction == 0:
            return tokens
        B, T = tokens.shape
        copy = torch.rand(B, generator=generator) < self.repeat_fraction
        if self.layout == "periodic":
            period = torch.randint(self.span_min, self.span_max + 1, (B,), generator=generator)
            pos = torch.arange(T)
            gather = torch.where(copy[:, None], pos[None, :] % period[:, None], pos[None, :])
            return torch.gather(tokens, 1, gather)
        length = torch.randint(self.span_min, self.span_max + 1, (B,), generator=generator)
        # source start in [0, T - 2L], destination start in [src + L, T - L]
        u1, u2 = torch.rand(B, generator=generator), torch.rand(B, generator=generator)
        src = (u1 * (T - 2 * length + 1)).long()
        dst = src + length + (u2 * (T - length - (src + length) + 1)).long()
        pos = torch.arange(T)
        offset = pos[None, :] - dst[:, None]
        inside = (offset >= 0) & (offset < length[:, None]) & copy[:, None]
        gather = torch.where(inside, src[:, None] + offset, pos[None, :])
        return torch.gather(tokens, 1, gather)
