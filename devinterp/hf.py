"""HuggingFace checkpoint folders: find their steps, read their weights, rebuild their model.

Used by :meth:`devinterp.store.SnapshotStore.from_hf_checkpoints` and ``devinterp analyze``.
A folder of checkpoints is what the HF ``Trainer`` writes (``checkpoint-<step>/``) or a series
of ``save_pretrained`` folders (``step<step>/``, ``step-<step>/``, as Pythia's revisions); a
folder without a step in its name gets it from its ``trainer_state.json`` (``global_step``).
Each checkpoint folder holds ``config.json`` and its weights (``model.safetensors``, sharded
``model-*.safetensors`` with an index, or ``pytorch_model.bin`` read with ``weights_only``).

``transformers`` is imported only to build the model (:func:`causal_lm_from_config`) and to
load weights into its parameter names (:func:`load_checkpoint`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from torch import Tensor, nn

from devinterp.errors import CorruptSnapshotError, FactoryError, StoreNotFoundError

__all__ = ["find_checkpoints", "is_hf_checkpoint_folder", "load_checkpoint", "read_config",
           "causal_lm_from_config", "MODEL_FACTORY"]

#: What ``run.json``-like run info names as the model factory of an HF checkpoint folder.
MODEL_FACTORY = "devinterp.hf:causal_lm_from_config"
_STEP_RE = re.compile(r"^(?:checkpoint-|step-?|global_step-?)(\d+)$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")


def _has_weights(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json")) and any(
        os.path.isfile(os.path.join(folder, w)) for w in _WEIGHTS)


def _step_of(folder: str) -> int | None:
    m = _STEP_RE.match(os.path.basename(os.path.normpath(folder)))
    if m:
        return int(m.group(1))
    state = os.path.join(folder, "trainer_state.json")
    if os.path.isfile(state):
        try:
            step = json.loads(open(state).read()).get("global_step")
        except ValueError as exc:
            raise CorruptSnapshotError(f"{state} is not valid JSON ({exc})") from exc
        if isinstance(step, int):
            return step
    return None


def find_checkpoints(root: str) -> dict[int, str]:
    """``{step: folder}`` of the HF checkpoints in ``root`` (or ``root`` itself if it is one).

    Raises:
        StoreNotFoundError: ``root`` does not exist or holds no checkpoint with a step.
    """
    if not os.path.isdir(root):
        raise StoreNotFoundError(f"no checkpoint folder at {root}: the path does not exist")
    candidates = [os.path.join(root, n) for n in sorted(os.listdir(root))
                  if os.path.isdir(os.path.join(root, n))]
    if _has_weights(root):
        candidates.append(root)
    found: dict[int, str] = {}
    unnamed = []
    for folder in candidates:
        if not _has_weights(folder):
            continue
        step = _step_of(folder)
        if step is None:
            unnamed.append(os.path.basename(folder))
        elif step not in found:
            found[step] = folder
    if not found:
        hint = f" (folders without a step: {unnamed[:5]})" if unnamed else ""
        raise StoreNotFoundError(
            f"{root} holds no HuggingFace checkpoints: expected folders named checkpoint-<step>, "
            f"step<step> or step-<step> (or with a trainer_state.json) holding config.json and "
            f"model.safetensors / pytorch_model.bin{hint}"
        )
    return found


def is_hf_checkpoint_folder(root: str) -> bool:
    """Whether ``root`` is (or holds) HuggingFace checkpoints :func:`find_checkpoints` reads."""
    try:
        find_checkpoints(root)
    except (StoreNotFoundError, CorruptSnapshotError, OSError):
        return False
    return True


def read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    try:
        return json.loads(open(path).read())
    except (OSError, ValueError) as exc:
        raise CorruptSnapshotError(f"{path} cannot be read as JSON ({exc})") from exc


def weight_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
               if n.endswith((".safetensors", ".bin")))


def _raw_weights(folder: str) -> dict[str, Tensor]:
    """The tensors of the weight files as stored (safetensors, or ``.bin`` with weights_only)."""
    import torch

    index = next((os.path.join(folder, n) for n in ("model.safetensors.index.json",
                                                       "pytorch_model.bin.index.json")
                  if os.path.isfile(os.path.join(folder, n))), None)
    if index is not None:
        files = sorted(set(json.loads(open(index).read())["weight_map"].values()))
    else:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(folder, n))][:1]
    out: dict[str, Tensor] = {}
    for name in files:
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            out.update(load_file(path))
        else:
            out.update(torch.load(path, map_location="cpu", weights_only=True))
    return out


def load_checkpoint(folder: str) -> dict[str, Tensor]:
    """The weights of one checkpoint folder under the parameter names of the model it rebuilds.

    With ``transformers`` installed, the model is built from ``config.json`` and loaded by
    ``transformers`` itself (so its key renamings and tied weights apply); otherwise the tensors
    are returned as stored.

    Raises:
        CorruptSnapshotError: A file is missing or cannot be read (named in the message).
    """
    try:
        import transformers  # noqa: F401
    except ImportError:
        transformers = None
    try:
        if transformers is None:
            return _raw_weights(folder)
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype="auto")
        finally:
            hf_logging.set_verbosity(verbosity)
        return {k: v.detach() for k, v in model.state_dict().items()}
    except Exception as exc:
        raise CorruptSnapshotError(f"{folder} cannot be read as a HuggingFace checkpoint ({exc})") from exc


def causal_lm_from_config(hparams: dict[str, Any]) -> nn.Module:
    """A freshly built ``AutoModelForCausalLM`` from a ``config.json`` dict (no hub access).

    This is the model factory ``devinterp analyze`` uses for a folder of HF checkpoints; the
    weights are then loaded from each checkpoint.
    """
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        raise FactoryError(
            "reading HuggingFace checkpoints needs transformers: pip install 'devinterp-tracker[hf]'"
        ) from exc
    config = dict(hparams)
    model_type = config.pop("model_type", None)
    if not model_type:
        raise FactoryError("config.json has no model_type: pass --model package.module:factory")
    for key in ("transformers_version", "architectures", "_name_or_path"):
        config.pop(key, None)
    cfg = AutoConfig.for_model(model_type, **config)
    return AutoModelForCausalLM.from_config(cfg)
