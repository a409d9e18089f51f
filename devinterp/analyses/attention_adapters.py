"""Where a model's attention pattern is, and how to silence one head: adapters for capture.

:func:`devinterp.analyses.attention_capture.capture_attention` sees two kinds of attention by
itself (calls of ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` modules). Every
other model is read through an adapter that names modules of the model:

- :class:`ModuleAttention`: the general one. ``pattern`` names the modules whose output is the
  attention pattern ``(batch, heads, query, key)``, one per layer; ``head_input`` the modules whose
  *input* is the heads' outputs concatenated head by head ``(..., heads * d_head)`` (the output
  projection), or ``head_output`` those whose *output* is ``(batch, query, heads, d_head)`` (or
  the heads concatenated, ``(batch, query, heads * d_head)``).
  Ablating head ``h`` of layer ``l`` zeroes that head's slice there. Names are exact module names
  or globs (``fnmatch``) over ``model.named_modules()``; layer ``l`` is the ``l``-th matching module
  in that order (for every usual model, the order the layers run).
- :func:`transformer_lens_attention`: TransformerLens models (``TransformerBridge`` and
  HookedTransformer-style ``HookedRootModule``) through their hook points
  ``blocks.{l}.attn.hook_pattern`` (the pattern) and ``blocks.{l}.attn.hook_z`` (per-head outputs).
- :func:`hf_eager_attention`: HuggingFace ``transformers`` models running eager attention
  (``attn_implementation="eager"``): every attention module returns ``(output, weights)`` and the
  weights are the pattern (what ``output_attentions=True`` returns); ablation zeroes the head's slice
  of the input of its output projection (``o_proj``, ``c_proj``, ``dense`` or ``out_proj``).
  HuggingFace models on ``"sdpa"`` attention are read by the SDPA interception itself.

:func:`choose_adapter` picks one from the model's type (also for a model held inside a wrapper such
as a LightningModule); ``transformers`` and ``transformer_lens`` are never imported here: models
are recognised by their attributes.

Hand-written attention (nanoGPT without flash, most research code) needs one line in the model if
no module sees the pattern: ``att = self.hook_pattern(att)`` with ``self.hook_pattern =
nn.Identity()``; then::

    adapter = ModuleAttention(pattern="blocks.*.attn.hook_pattern", head_input="blocks.*.attn.c_proj")
    induction_scores(model, vocab_size=V, attention=adapter)

(in nanoGPT's ``CausalSelfAttention`` the ``attn_dropout`` module already sees the pattern: use
``pattern="transformer.h.*.attn.attn_dropout"``; in eval mode its output is the pattern itself).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from devinterp.errors import AttentionNotFoundError, InvalidInputError

__all__ = [
    "ModuleAttention",
    "transformer_lens_attention",
    "hf_eager_attention",
    "choose_adapter",
    "ADAPTER_EXAMPLE",
]

#: The three lines the error for an unknown model shows.
ADAPTER_EXAMPLE = (
    "    from devinterp.analyses import ModuleAttention\n"
    "    adapter = ModuleAttention(pattern=\"blocks.*.attn.attn_dropout\",  # output: (batch, heads, q, k)\n"
    "                              head_input=\"blocks.*.attn.c_proj\")     # input: heads concatenated\n"
    "    induction_scores(model, vocab_size=V, attention=adapter)"
)

_HF_OUT_PROJ = ("o_proj", "c_proj", "dense", "out_proj", "proj")


def _names(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    if spec is None:
        return ()
    return (spec,) if isinstance(spec, str) else tuple(spec)


def _match(model: nn.Module, spec: tuple[str, ...], what: str) -> list[tuple[str, nn.Module]]:
    named = list(model.named_modules())
    hits = [(n, m) for n, m in named if any(n == s or fnmatch.fnmatchcase(n, s) for s in spec)]
    if not hits:
        sample = [n for n, _ in named if n][:12]
        raise AttentionNotFoundError(
            f"{what}={list(spec)!r} matches no module of {type(model).__name__}; module names look "
            f"like {sample}"
        )
    return hits


@dataclass(frozen=True)
class ModuleAttention:
    """Attention read from named modules of the model (see the module docstring).

    Args:
        pattern: Names or globs of the modules whose output is the pattern ``(batch, heads, q, k)``
            (rows summing to 1), one module per layer.
        head_input: Names or globs of the modules whose input is the heads' outputs concatenated
            ``(..., heads * d_head)``, head ``h`` in the slice ``[h * d_head, (h + 1) * d_head)``
            (the output projection); used to ablate heads.
        head_output: Instead of ``head_input``: modules whose output is ``(batch, q, heads,
            d_head)`` or ``(batch, q, heads * d_head)`` (e.g. TransformerLens' ``hook_z``).
        output_index: When a pattern module returns a tuple, the item that is the pattern (e.g.
            ``1`` for a HuggingFace attention module, which returns ``(output, weights)``).
        num_heads: Heads per layer, when the ablation module runs before the pattern module in a
            forward pass (otherwise read from the pattern).
        name: What :attr:`HeadScores.source` reports.

    Without ``head_input``/``head_output`` patterns are recorded but heads cannot be ablated (the
    copying score needs ablation).
    """

    pattern: str | Sequence[str]
    head_input: str | Sequence[str] | None = None
    head_output: str | Sequence[str] | None = None
    output_index: int | None = None
    num_heads: int | Sequence[int] | None = None
    name: str = "modules"

    def __post_init__(self):
        if not _names(self.pattern):
            raise InvalidInputError("ModuleAttention needs pattern=<module name or glob>")
        if self.head_input is not None and self.head_output is not None:
            raise InvalidInputError("ModuleAttention takes head_input or head_output, not both")

    # -- installation --------------------------------------------------------------------------
    def install(self, model: nn.Module, cap) -> list[Callable[[], None]]:
        """Register the hooks on ``model`` that feed ``cap``; returns the undo callables."""
        patterns = _match(model, _names(self.pattern), "pattern")
        ablators: list[tuple[str, nn.Module]] = []
        if self.head_input is not None or self.head_output is not None:
            kind = "head_input" if self.head_input is not None else "head_output"
            ablators = _match(model, _names(self.head_input or self.head_output), kind)
            if len(ablators) != len(patterns):
                raise InvalidInputError(
                    f"ModuleAttention: {len(patterns)} pattern modules but {len(ablators)} {kind} "
                    f"modules; they must pair up layer by layer "
                    f"({[n for n, _ in patterns]} vs {[n for n, _ in ablators]})"
                )
        heads = self.num_heads
        if heads is not None and not isinstance(heads, int) and len(heads) != len(patterns):
            raise InvalidInputError(f"num_heads has {len(heads)} entries for {len(patterns)} layers")
        known: dict[int, int] = {}
        if heads is not None:
            known = {i: int(heads if isinstance(heads, int) else heads[i]) for i in range(len(patterns))}
        handles = []
        for layer, (name, module) in enumerate(patterns):
            handles.append(module.register_forward_hook(self._pattern_hook(cap, layer, name, known)))
        for layer, (_, module) in enumerate(ablators):
            if self.head_input is not None:
                handles.append(module.register_forward_pre_hook(self._input_hook(cap, layer, known)))
            else:
                handles.append(module.register_forward_hook(self._output_hook(cap, layer, known)))
        return [h.remove for h in handles]

    def _pattern_hook(self, cap, layer: int, name: str, known: dict[int, int]):
        index = self.output_index

        def hook(module, args, output):
            pattern = output if index is None else output[index]
            if not isinstance(pattern, Tensor) or pattern.dim() != 4:
                got = type(pattern).__name__ if not isinstance(pattern, Tensor) else tuple(pattern.shape)
                raise AttentionNotFoundError(
                    f"the pattern module {name!r} gave {got}, not a pattern (batch, heads, q, k)"
                    + (f" at output[{index}]" if index is not None else "")
                )
            known[layer] = pattern.size(1)
            cap._add_layer(layer, self.name, pattern.size(1), name,
                           pattern.detach().float() if cap.record else None)
            return None

        return hook

    def _heads(self, cap, layer: int, known: dict[int, int], width: int | None = None) -> list[int]:
        wanted = [h for (lay, h) in cap.ablate if lay == layer]
        if not wanted:
            return []
        n = known.get(layer, width)
        if n is None:
            raise InvalidInputError(
                f"cannot tell how many heads layer {layer} has before its pattern is seen: pass "
                "num_heads= to ModuleAttention"
            )
        return cap._heads_to_ablate(layer, n)

    def _input_hook(self, cap, layer: int, known: dict[int, int]):
        def hook(module, args):
            heads = self._heads(cap, layer, known)
            if not heads:
                return None
            x = args[0].clone()
            _zero_slices(x, heads, known[layer], layer)
            return (x, *args[1:])

        return hook

    def _output_hook(self, cap, layer: int, known: dict[int, int]):
        def hook(module, args, output):
            per_head = output.dim() >= 4  # (batch, q, heads, d_head); else heads concatenated
            heads = self._heads(cap, layer, known, width=output.size(-2) if per_head else None)
            if not heads:
                return None
            out = output.clone()
            if per_head:
                out[..., heads, :] = 0
            else:
                _zero_slices(out, heads, known[layer], layer)
            return out

        return hook


def _zero_slices(x: Tensor, heads: list[int], num_heads: int, layer: int) -> None:
    """Zero, in place, head ``h``'s slice ``[h * d, (h + 1) * d)`` of the last dimension."""
    if x.size(-1) % num_heads:
        raise InvalidInputError(
            f"layer {layer}: {x.size(-1)} features of the heads' outputs are not a multiple of its "
            f"{num_heads} heads"
        )
    d = x.size(-1) // num_heads
    for h in heads:
        x[..., h * d:(h + 1) * d] = 0


# ----------------------------------------------------------------------------------------------
# TransformerLens
# ----------------------------------------------------------------------------------------------
def _is_transformer_lens(module: nn.Module) -> bool:
    hooks = getattr(module, "hook_dict", None)
    return isinstance(hooks, dict) and any(k.endswith("attn.hook_pattern") for k in hooks)


@dataclass(frozen=True)
class _HookDictAttention:
    """TransformerLens hook points: ``blocks.{l}.attn.hook_pattern`` and ``blocks.{l}.attn.hook_z``."""

    name: str = "transformer_lens"

    def install(self, model: nn.Module, cap) -> list[Callable[[], None]]:
        root = next((m for m in model.modules() if _is_transformer_lens(m)), None)
        if root is None:
            raise AttentionNotFoundError(
                f"{type(model).__name__} holds no TransformerLens model (no hook_dict with "
                "blocks.*.attn.hook_pattern)"
            )
        hooks = root.hook_dict
        layers = sorted(int(k.split(".")[1]) for k in hooks
                        if k.startswith("blocks.") and k.endswith(".attn.hook_pattern"))
        known: dict[int, int] = {}
        adapter = ModuleAttention(pattern="-", name=self.name)
        undo = []
        for layer in layers:
            hp = hooks[f"blocks.{layer}.attn.hook_pattern"]
            h = hp.register_forward_hook(adapter._pattern_hook(cap, layer, f"blocks.{layer}.attn.hook_pattern",
                                                               known))
            undo.append(h.remove)
            hz = hooks.get(f"blocks.{layer}.attn.hook_z")
            if hz is not None:
                undo.append(hz.register_forward_hook(adapter._output_hook(cap, layer, known)).remove)
        return undo


def transformer_lens_attention() -> _HookDictAttention:
    """The adapter of TransformerLens models (``TransformerBridge``, ``HookedTransformer``)."""
    return _HookDictAttention()


# ----------------------------------------------------------------------------------------------
# HuggingFace transformers
# ----------------------------------------------------------------------------------------------
def _hf_config(module: nn.Module):
    config = getattr(module, "config", None)
    return config if config is not None and hasattr(config, "_attn_implementation") else None


def _hf_root(model: nn.Module) -> nn.Module | None:
    """The outermost HuggingFace ``PreTrainedModel`` in ``model`` (recognised by its config)."""
    for m in model.modules():
        if _hf_config(m) is not None and hasattr(m, "base_model_prefix"):
            return m
    return None


def hf_attention_implementation(model: nn.Module) -> str | None:
    """``config._attn_implementation`` of the HuggingFace model inside ``model``, or None."""
    root = _hf_root(model)
    return None if root is None else _hf_config(root)._attn_implementation


def hf_eager_attention(model: nn.Module) -> ModuleAttention:
    """A :class:`ModuleAttention` over the attention modules of a HuggingFace model in eager mode.

    Attention modules are the submodules whose class name ends in ``Attention`` and that have a
    ``layer_idx`` (self-attention of a decoder layer); the pattern is their output ``[1]``; the
    output projection is their child ``o_proj``, ``c_proj``, ``dense``, ``out_proj`` or ``proj``.
    """
    root = _hf_root(model)
    if root is None:
        raise AttentionNotFoundError(f"{type(model).__name__} holds no HuggingFace model")
    prefix = next(n for n, m in model.named_modules() if m is root)
    attn = [(n, m) for n, m in root.named_modules()
            if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")
            and not getattr(m, "is_cross_attention", False)]
    if not attn:
        raise AttentionNotFoundError(
            f"no attention modules found in {type(root).__name__} (looked for submodules named "
            "*Attention with a layer_idx)"
        )
    pattern, proj, heads = [], [], []
    for name, module in attn:
        child = next((c for c in _HF_OUT_PROJ if isinstance(getattr(module, c, None), nn.Module)), None)
        if child is None:
            raise AttentionNotFoundError(
                f"{type(module).__name__} at {name!r} has no output projection named one of {_HF_OUT_PROJ}"
            )
        full = f"{prefix}.{name}" if prefix else name
        pattern.append(full)
        proj.append(f"{full}.{child}")
        n = getattr(module, "num_heads", None) or getattr(getattr(module, "config", None),
                                                           "num_attention_heads", None)
        heads.append(int(n) if n else None)
    return ModuleAttention(pattern=pattern, head_input=proj, output_index=1,
                           num_heads=heads if all(h is not None for h in heads) else None,
                           name="hf-eager")


def choose_adapter(model: nn.Module):
    """The adapter for ``model`` from its type, or None for the SDPA / MultiheadAttention capture.

    TransformerLens first (a ``TransformerBridge`` also holds HuggingFace modules), then a
    HuggingFace model in eager attention. A HuggingFace model on another implementation than
    ``"sdpa"``/``"eager"`` (flash, flex) cannot be read: the error says to switch.
    """
    if any(_is_transformer_lens(m) for m in model.modules()):
        return transformer_lens_attention()
    impl = hf_attention_implementation(model)
    if impl == "eager":
        return hf_eager_attention(model)
    if impl is not None and impl != "sdpa":
        raise AttentionNotFoundError(
            f"the HuggingFace model uses attn_implementation={impl!r}, whose pattern cannot be seen: "
            "call model.set_attn_implementation('eager') (or 'sdpa') before scoring"
        )
    return None
