"""Ready losses ``loss_fn(model, batch) -> scalar`` for the LLC of language models.

:func:`lm_loss` is what :func:`~devinterp.analyses.estimate_llc`, :func:`~devinterp.analyses.calibrate`
and :class:`~devinterp.callbacks.LLCCallback` use when no loss is passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from devinterp.errors import InvalidInputError

__all__ = ["lm_loss", "logits_of"]

#: Label value that :func:`lm_loss` (like HuggingFace) leaves out of the mean.
IGNORE_INDEX = -100


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, an object with ``.logits`` (a HuggingFace
    ``ModelOutput``), or a tuple/list whose first item is the logits."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise InvalidInputError(
        f"the model returned {type(output).__name__}; lm_loss needs logits (batch, T, vocab), an "
        "object with .logits, or a tuple whose first item is the logits"
    )


def _check_tokens(tokens: Any, what: str) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.dim() < 1:
        raise InvalidInputError(
            f"lm_loss: {what} must be an integer tensor of token ids (batch, T), got "
            f"{type(tokens).__name__}{'' if not isinstance(tokens, Tensor) else f' {tokens.dtype}'}"
        )
    return tokens


def _next_token_ce(logits: Tensor, targets: Tensor, shift: bool) -> Tensor:
    if shift:
        logits, targets = logits[..., :-1, :], targets[..., 1:]
    if targets.numel() == 0:
        raise InvalidInputError("lm_loss: sequences need at least 2 tokens to predict a next one")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def lm_loss(model: nn.Module, batch: Any) -> Tensor:
    """Mean next-token cross-entropy of a language model on a batch.

    ``batch`` is what a DataLoader over the data yields:

    - a tensor of token ids ``(batch, T)``: ``model(tokens)``, then cross-entropy of the logits at
      positions ``0..T-2`` against the tokens ``1..T-1``;
    - a dict (or HuggingFace ``BatchEncoding``) with ``input_ids`` and optionally ``labels`` and
      ``attention_mask``: ``model(**batch)``. With ``labels`` and an output with a ``.loss`` (a
      HuggingFace model), that loss is returned; otherwise the shifted cross-entropy against
      ``labels`` (else ``input_ids``), leaving out label ``-100`` and padded positions
      (``attention_mask == 0``);
    - a 1-tuple ``(tokens,)`` (a ``TensorDataset``): as a tensor; a pair ``(inputs, targets)`` of
      equal shape: nanoGPT's ``x, y``, where ``targets[t]`` is the token that follows
      ``inputs[t]`` (cross-entropy at every position, no shift).

    The model may return logits ``(batch, T, vocab)``, an object with ``.logits`` (e.g. a
    HuggingFace ``ModelOutput``, also from a LightningModule wrapping one) or a tuple whose first
    item is the logits.

    Raises:
        InvalidInputError: The batch or the output has none of these forms.
    """
    if isinstance(batch, Tensor):
        tokens = _check_tokens(batch, "the batch")
        return _next_token_ce(logits_of(model(tokens)), tokens, shift=True)
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise InvalidInputError(
                f"lm_loss: a dict batch needs 'input_ids' (got keys {sorted(batch)})"
            )
        tokens = _check_tokens(batch["input_ids"], "batch['input_ids']")
        inputs = dict(batch)
        output = model(**inputs) if len(inputs) > 1 else model(tokens)
        labels = batch.get("labels")
        if labels is not None:
            loss = getattr(output, "loss", None)
            if isinstance(loss, Tensor) and loss.numel() == 1:
                return loss.reshape(())
        targets = tokens if labels is None else _check_tokens(labels, "batch['labels']")
        mask = batch.get("attention_mask")
        if mask is not None and labels is None:
            targets = targets.masked_fill(mask == 0, IGNORE_INDEX)
        return _next_token_ce(logits_of(output), targets, shift=True)
    if isinstance(batch, (tuple, list)) and batch:
        if len(batch) == 1:
            return lm_loss(model, batch[0])
        if len(batch) == 2 and isinstance(batch[1], Tensor) and isinstance(batch[0], Tensor) \
                and batch[0].shape == batch[1].shape:
            inputs = _check_tokens(batch[0], "inputs")
            targets = _check_tokens(batch[1], "targets")
            return _next_token_ce(logits_of(model(inputs)), targets, shift=False)
    raise InvalidInputError(
        f"lm_loss cannot read a batch of type {type(batch).__name__}: it takes token ids (batch, T), "
        "a dict with input_ids (and labels), (tokens,) or (inputs, targets); pass your own "
        "loss_fn(model, batch) otherwise"
    )
