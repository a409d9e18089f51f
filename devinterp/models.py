"""A reference transformer for circuit studies, and a fast recipe that grows an induction head.

:class:`AttentionOnlyTransformer` is the 2-layer attention-only model of Olsson et al. (2022) in
plain PyTorch: token and learned positional embeddings, residual attention blocks (optionally with a
pre-LayerNorm), an unembedding. Attention goes through
:func:`torch.nn.functional.scaled_dot_product_attention` with ``is_causal=True``, so the circuit
analyses (:mod:`devinterp.analyses.circuits`) see it like any user model.

Per-head weights are stored head-first, so one head is one index:

=========================== ============================= =====================================
name                        shape                         role
=========================== ============================= =====================================
``embed.weight``            ``(vocab, d_model)``          token embedding
``pos_embed``               ``(n_ctx, d_model)``          learned positions
``blocks.{l}.attn.W_Q``     ``(heads, d_model, d_head)``  queries (also ``W_K``, ``W_V``)
``blocks.{l}.attn.b_Q``     ``(heads, d_head)``           query bias (also ``b_K``, ``b_V``)
``blocks.{l}.attn.W_O``     ``(heads, d_head, d_model)``  output projection of each head
``blocks.{l}.attn.b_O``     ``(d_model,)``                output bias (shared by all heads)
``blocks.{l}.ln.*``         ``(d_model,)``                pre-LayerNorm (only if ``layer_norm``)
``ln_final.*``              ``(d_model,)``                final LayerNorm (only if ``layer_norm``)
``W_U`` / ``b_U``           ``(d_model, vocab)``/(vocab)  unembedding
=========================== ============================= =====================================

:func:`induction_recipe` is the fastest setting we found that makes this model form an induction
head on one or two CPU threads; :func:`train_induction_model` trains it (plain PyTorch loop) and
reports the loss and the head scores along the way. Numbers are in ``docs/circuits.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from devinterp.errors import InvalidInputError

__all__ = [
    "AttentionOnlyTransformer",
    "InductionRecipe",
    "induction_recipe",
    "TrainingLog",
    "train_induction_model",
]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")


class Attention(nn.Module):
    """Multi-head causal self-attention with head-first weights (see the module docstring)."""

    def __init__(self, d_model: int, n_heads: int, d_head: int, *, bias: bool = True):
        super().__init__()
        self.n_heads, self.d_head = n_heads, d_head
        self.W_Q = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_K = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_V = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.W_O = nn.Parameter(torch.empty(n_heads, d_head, d_model))
        if bias:
            self.b_Q = nn.Parameter(torch.zeros(n_heads, d_head))
            self.b_K = nn.Parameter(torch.zeros(n_heads, d_head))
            self.b_V = nn.Parameter(torch.zeros(n_heads, d_head))
            self.b_O = nn.Parameter(torch.zeros(d_model))
        else:
            for name in ("b_Q", "b_K", "b_V", "b_O"):
                self.register_parameter(name, None)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        H, dh = self.n_heads, self.d_head
        # one matmul for q, k and v: (d, 3 * H * dh), head-major within each of q, k, v
        w = torch.cat([self.W_Q, self.W_K, self.W_V], dim=0).permute(1, 0, 2).reshape(d, 3 * H * dh)
        qkv = (x @ w).view(B, T, 3, H, dh)
        if self.b_Q is not None:
            qkv = qkv + torch.stack([self.b_Q, self.b_K, self.b_V])
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, dh)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, dh)
        out = z.transpose(1, 2).reshape(B, T, H * dh) @ self.W_O.reshape(H * dh, d)
        return out if self.b_O is None else out + self.b_O


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_head: int, *, layer_norm: bool, bias: bool):
        super().__init__()
        self.ln = nn.LayerNorm(d_model) if layer_norm else nn.Identity()
        self.attn = Attention(d_model, n_heads, d_head, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attn(self.ln(x))


class AttentionOnlyTransformer(nn.Module):
    """An attention-only transformer: ``tokens (batch, T) -> logits (batch, T, vocab)``.

    Args:
        vocab_size: Number of token ids.
        n_layers: Number of attention blocks.
        n_heads: Heads per block.
        d_model: Width of the residual stream.
        n_ctx: Longest sequence the positional embedding covers.
        d_head: Width of each head (default ``d_model // n_heads``).
        layer_norm: Pre-LayerNorm in each block and before the unembedding.
        bias: Biases on the projections and the unembedding.
        init_std: Standard deviation of the normal initialisation of embeddings and projections
            (default ``1 / sqrt(d_model)``); LayerNorms start at identity, biases at zero.
        seed: If given, the weights are initialised from ``torch.Generator().manual_seed(seed)``
            (independent of the global RNG).
    """

    def __init__(
        self,
        vocab_size: int,
        n_layers: int = 2,
        n_heads: int = 8,
        d_model: int = 128,
        n_ctx: int = 128,
        *,
        d_head: int | None = None,
        layer_norm: bool = False,
        bias: bool = True,
        init_std: float | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        d_head = d_model // n_heads if d_head is None and n_heads and d_model else d_head
        _check_positive(vocab_size=vocab_size, n_layers=n_layers, n_heads=n_heads,
                        d_model=d_model, n_ctx=n_ctx, d_head=d_head)
        if init_std is not None and not init_std > 0:
            raise InvalidInputError(f"init_std must be > 0, got {init_std}")
        self.vocab_size, self.n_layers, self.n_heads = vocab_size, n_layers, n_heads
        self.d_model, self.n_ctx, self.d_head = d_model, n_ctx, d_head
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Parameter(torch.empty(n_ctx, d_model))
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_head, layer_norm=layer_norm, bias=bias) for _ in range(n_layers)
        )
        self.ln_final = nn.LayerNorm(d_model) if layer_norm else nn.Identity()
        self.W_U = nn.Parameter(torch.empty(d_model, vocab_size))
        self.b_U = nn.Parameter(torch.zeros(vocab_size)) if bias else None
        self.reset_parameters(init_std, seed=seed)

    @torch.no_grad()
    def reset_parameters(self, init_std: float | None = None, *, seed: int | None = None) -> None:
        """Re-initialise every weight (see the class docstring)."""
        std = 1.0 / math.sqrt(self.d_model) if init_std is None else init_std
        gen = None if seed is None else torch.Generator().manual_seed(int(seed))
        for name, p in self.named_parameters():
            if name.endswith(("ln.weight", "ln_final.weight")):
                p.fill_(1.0)
            elif ".b_" in name or name.startswith("b_") or name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise InvalidInputError(
                f"tokens must be an integer tensor (batch, T), got {tuple(tokens.shape)} {tokens.dtype}"
            )
        T = tokens.shape[1]
        if T > self.n_ctx:
            raise InvalidInputError(f"sequence length {T} exceeds n_ctx={self.n_ctx}")
        x = self.embed(tokens) + self.pos_embed[:T]
        for block in self.blocks:
            x = block(x)
        logits = self.ln_final(x) @ self.W_U
        return logits if self.b_U is None else logits + self.b_U

    def head_param_masks(self, layer: int, head: int) -> dict[str, Tensor]:
        """Boolean masks selecting the weights of one head: ``{name: mask}``.

        The masks cover that head's slices of ``W_Q, W_K, W_V, W_O`` and ``b_Q, b_K, b_V``
        (``b_O`` is shared by all heads and is left out). Pass them as ``params=`` to
        ``estimate_llc`` for the weight-refined LLC of the head.
        """
        if not 0 <= layer < self.n_layers or not 0 <= head < self.n_heads:
            raise InvalidInputError(
                f"no head L{layer}H{head}: the model has {self.n_layers} layers x {self.n_heads} heads"
            )
        masks = {}
        for name, p in self.blocks[layer].attn.named_parameters():
            if name == "b_O":
                continue
            mask = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
            mask[head] = True
            masks[f"blocks.{layer}.attn.{name}"] = mask
        return masks


# ----------------------------------------------------------------------------------------------
# The fast induction-head recipe
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InductionRecipe:
    """Everything needed to grow an induction head in an :class:`AttentionOnlyTransformer`.

    The data is :class:`devinterp.data.InductionData`: sequences from a random sparse bigram
    "language" (16 successors per token) whose first ``k`` tokens (``k`` uniform in 6..16) repeat
    periodically, so bigram statistics are learnt first (a shoulder in the loss) and induction later
    (a second, steeper drop). The optimiser is AdamW with a short linear warm-up. On one CPU thread
    the max induction score crosses 0.6 after about 175 steps (a few seconds); see
    ``docs/circuits.md``.
    """

    vocab_size: int = 32
    n_ctx: int = 32
    n_layers: int = 2
    n_heads: int = 2
    d_model: int = 64
    layer_norm: bool = False
    init_std: float | None = None
    lr: float = 2e-2
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 20
    batch_size: int = 32
    steps: int = 400
    repeat_fraction: float = 1.0
    span_min: int = 6
    span_max: int = 16
    branching: int = 16
    layout: str = "periodic"

    def build_model(self, seed: int = 0) -> AttentionOnlyTransformer:
        """A freshly initialised model for this recipe."""
        return AttentionOnlyTransformer(
            self.vocab_size, self.n_layers, self.n_heads, self.d_model, self.n_ctx,
            layer_norm=self.layer_norm, init_std=self.init_std, seed=seed,
        )

    def build_data(self, seed: int = 0):
        """The synthetic training data for this recipe (a :class:`devinterp.data.InductionData`)."""
        from devinterp.data import InductionData

        return InductionData(
            self.vocab_size, self.n_ctx, seed=seed, repeat_fraction=self.repeat_fraction,
            span_min=self.span_min, span_max=self.span_max, branching=self.branching,
            layout=self.layout,
        )

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.lr, betas=self.betas,
                                 weight_decay=self.weight_decay)

    def to_dict(self) -> dict:
        return asdict(self)


def induction_recipe(**overrides) -> InductionRecipe:
    """The fastest measured recipe (see ``docs/circuits.md``), with optional field overrides."""
    return InductionRecipe(**overrides)


@dataclass(frozen=True)
class TrainingLog:
    """What :func:`train_induction_model` saw: the training loss and the scores at eval steps."""

    loss_steps: tuple[int, ...]
    losses: tuple[float, ...]
    eval_steps: tuple[int, ...]
    max_induction: tuple[float, ...]
    max_previous_token: tuple[float, ...]
    seconds: tuple[float, ...]  # wall time of training (not scoring) at each eval step

    def crossing(self, threshold: float) -> tuple[int, float] | None:
        """``(step, seconds)`` of the first eval where the max induction score is >= ``threshold``."""
        for step, score, sec in zip(self.eval_steps, self.max_induction, self.seconds, strict=True):
            if score >= threshold:
                return step, sec
        return None


def train_induction_model(
    recipe: InductionRecipe | None = None,
    *,
    seed: int = 0,
    steps: int | None = None,
    eval_every: int = 50,
    score_sequences: int = 32,
    stop_at: float | None = None,
    on_eval: Callable[[int, object], None] | None = None,
    model: AttentionOnlyTransformer | None = None,
) -> tuple[AttentionOnlyTransformer, TrainingLog]:
    """Train the reference model on the recipe's synthetic data with a plain PyTorch loop.

    Args:
        recipe: The recipe (default :func:`induction_recipe`).
        seed: Seeds the initialisation, the data and the scoring sequences.
        steps: Number of optimizer steps (default ``recipe.steps``).
        eval_every: Score the heads every this many steps (and at steps 0 and the last).
        score_sequences: Repeated random sequences used for each scoring.
        stop_at: Stop early once the max induction score reaches this value.
        on_eval: Called as ``on_eval(step, head_scores)`` after each scoring.
        model: Train this model instead of a fresh ``recipe.build_model(seed)``.

    Returns:
        The trained model and a :class:`TrainingLog`.
    """
    from devinterp.analyses.circuits import induction_scores

    recipe = induction_recipe() if recipe is None else recipe
    steps = recipe.steps if steps is None else steps
    _check_positive(eval_every=eval_every, score_sequences=score_sequences)
    if steps < 0:
        raise InvalidInputError(f"steps must be >= 0, got {steps}")
    model = recipe.build_model(seed) if model is None else model
    data = recipe.build_data(seed)
    opt = recipe.build_optimizer(model)
    warmup = max(1, recipe.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator().manual_seed(seed + 1)
    loss_steps, losses, ev_steps, ind, prev, secs = [], [], [], [], [], []
    train_time = 0.0

    def evaluate(step: int) -> bool:
        scores = induction_scores(model, vocab_size=recipe.vocab_size, seq_len=recipe.n_ctx,
                                  num_sequences=score_sequences, seed=seed + 2, copying=False)
        ev_steps.append(step)
        ind.append(float(scores.induction.max()))
        prev.append(float(scores.previous_token.max()))
        secs.append(train_time)
        if on_eval is not None:
            on_eval(step, scores)
        return stop_at is not None and ind[-1] >= stop_at

    stop = evaluate(0)
    model.train()
    for step in range(1, steps + 1):
        if stop:
            break
        t0 = time.perf_counter()
        tokens = data.sample(recipe.batch_size, generator=gen)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        train_time += time.perf_counter() - t0
        loss_steps.append(step)
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            stop = evaluate(step)
            model.train()
    model.eval()
    log = TrainingLog(tuple(loss_steps), tuple(losses), tuple(ev_steps), tuple(ind), tuple(prev),
                      tuple(secs))
    return model, log
