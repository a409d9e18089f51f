"""Import user code named on the command line: ``package.module:attribute`` factories.

Shared by ``devinterp analyze``, ``devinterp calibrate`` and any command that needs a model, data or
a loss the library cannot guess. The contracts (also in ``docs/posthoc.md``):

- **model** factory: a callable returning an ``nn.Module`` (a ``LightningModule`` class works). It
  is called with the run's recorded hyper-parameters, see :func:`call_with_hparams`.
- **data** factory: a callable returning a ``Dataset``, a ``DataLoader``, a tensor or a tuple of
  tensors (samples along dimension 0); called like the model factory. A ``LightningDataModule``
  class also works (``prepare_data``, ``setup("fit")`` and ``train_dataloader()`` are called).
- **loss** function: ``loss_fn(model, batch) -> scalar tensor``, the mean loss of ``batch``.

A spec is ``package.module:name`` (``name`` may be dotted: ``module:Class.method``), or
``path/to/file.py:name`` for a file that is not on ``sys.path``. The current directory is put on
``sys.path`` (as ``python -m`` does), so a module next to where the command runs imports.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from devinterp.errors import FactoryError

__all__ = [
    "import_object",
    "call_with_hparams",
    "build_model",
    "as_data",
    "data_from_object",
    "loss_from_module",
    "module_loss",
]


def import_object(spec: str, *, what: str = "factory") -> Any:
    """Import ``package.module:name`` (or ``file.py:name``) and return the object.

    Args:
        spec: The path, e.g. ``"mypkg.models:make_model"``.
        what: What the object is for (``"model factory"``, ``"--data"``...), used in messages.

    Raises:
        FactoryError: The spec is malformed, the module does not import, or it has no such name;
            the message names the spec and says what to fix.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise FactoryError(
            f"{what} {spec!r} is not of the form package.module:name (or path/to/file.py:name); "
            "e.g. --model mypkg.models:make_model"
        )
    module_name, attr = spec.split(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        module = _import_file(module_name, spec, what)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise FactoryError(
                f"{what} {spec!r}: module {module_name!r} cannot be imported ({exc}). Install the "
                f"package that provides it, run from the folder that holds it, or add that folder to "
                f"PYTHONPATH"
            ) from exc
        except Exception as exc:
            raise FactoryError(
                f"{what} {spec!r}: importing module {module_name!r} failed with "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = sorted(n for n in dir(module) if not n.startswith("_"))[:20]
            raise FactoryError(
                f"{what} {spec!r}: {module_name!r} has no attribute {attr!r}; it defines {names}"
            ) from None
    return obj


def _import_file(path: str, spec: str, what: str) -> Any:
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FactoryError(f"{what} {spec!r}: file {str(file)!r} does not exist")
    name = f"_devinterp_user_{file.stem}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, file)
    if loader_spec is None or loader_spec.loader is None:
        raise FactoryError(f"{what} {spec!r}: {str(file)!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise FactoryError(f"{what} {spec!r}: running {str(file)!r} failed with {type(exc).__name__}: {exc}") from exc
    return module


def call_with_hparams(factory: Callable[..., Any], hparams: Mapping[str, Any] | None, *,
                      what: str = "factory") -> Any:
    """Call ``factory`` with the run's hyper-parameters, as far as its signature accepts them.

    The rule: a factory with a parameter named ``hparams`` gets the whole dict as ``hparams=``;
    otherwise it gets, as keyword arguments, the recorded hyper-parameters its signature names
    (all of them if it takes ``**kwargs``); the others are not passed. A factory without parameters
    is called with none. This is how a ``LightningModule`` class (``save_hyperparameters()``) is
    rebuilt from ``run.json``.

    Raises:
        FactoryError: The call failed (the message names the factory and the arguments passed).
    """
    if not callable(factory):
        raise FactoryError(f"{what} {_name(factory)} is not callable (got a {type(factory).__name__})")
    hparams = dict(hparams or {})
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature
        sig = None
    kwargs: dict[str, Any] = {}
    if sig is not None:
        params = sig.parameters
        if "hparams" in params:
            kwargs = {"hparams": hparams}
        elif any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            kwargs = hparams
        else:
            accepted = {n for n, p in params.items()
                        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
            kwargs = {k: v for k, v in hparams.items() if k in accepted}
    try:
        return factory(**kwargs)
    except FactoryError:
        raise
    except Exception as exc:
        raise FactoryError(
            f"{what} {_name(factory)} failed when called with {sorted(kwargs)} "
            f"({type(exc).__name__}: {exc}). Check that it matches the run's hyper-parameters, or "
            f"pass a factory that builds the trained network"
        ) from exc


def _name(obj: Any) -> str:
    mod = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
    return f"{mod}:{qual}" if mod else str(qual)


def build_model(factory: Callable[..., Any] | str, hparams: Mapping[str, Any] | None = None, *,
                what: str = "model factory") -> nn.Module:
    """Build the model with ``factory`` (or the spec of one) and the run's hyper-parameters.

    Raises:
        FactoryError: The factory does not import, fails, or returns something else than an
            ``nn.Module``.
    """
    if isinstance(factory, str):
        factory = import_object(factory, what=what)
    try:
        model = call_with_hparams(factory, hparams, what=what)
    except FactoryError as exc:
        raise FactoryError(
            f"{exc}. To build the model another way, pass --model package.module:factory, e.g. "
            f"--model mypkg.models:make_model (a function or class returning the trained network)"
        ) from exc
    if not isinstance(model, nn.Module):
        raise FactoryError(
            f"{what} {_name(factory)} returned {type(model).__name__}, not a torch.nn.Module; it must "
            f"return the network whose weights the snapshots hold"
        )
    return model


def _is_datamodule(obj: Any) -> bool:
    return all(hasattr(obj, a) for a in ("train_dataloader", "setup", "prepare_data")) and not isinstance(obj, nn.Module)


def data_from_object(obj: Any, *, what: str = "data factory") -> Any:
    """Data for the LLC from what a data factory returned (a datamodule is asked for its loader).

    Returns:
        A Dataset, DataLoader, or a tuple of tensors.

    Raises:
        FactoryError: ``None``, an empty dataset/loader/tuple, or an unsupported type.
    """
    if _is_datamodule(obj):
        obj.prepare_data()
        obj.setup("fit")
        obj = obj.train_dataloader()
    return as_data(obj, what=what)


def as_data(obj: Any, *, what: str = "data factory") -> Any:
    """Check that ``obj`` is usable LLC data (a single tensor stays a tensor: a dataset of its rows,
    whose batches are tensors, as a DataLoader over it yields them)."""
    if obj is None:
        raise FactoryError(
            f"{what} returned None; it must return a Dataset, a DataLoader or a tuple of tensors "
            f"holding the training data (samples along dimension 0)"
        )
    if isinstance(obj, Tensor):
        if obj.dim() == 0 or obj.shape[0] == 0:
            raise FactoryError(f"{what} returned a tensor with no samples along dimension 0; it must "
                               f"return the training data")
        return obj
    if isinstance(obj, list) and obj and all(isinstance(t, Tensor) for t in obj):
        obj = tuple(obj)
    if isinstance(obj, tuple):
        if not obj or not all(isinstance(t, Tensor) for t in obj):
            raise FactoryError(f"{what} returned a tuple that is empty or holds non-tensors; "
                               f"return a tuple of tensors with samples along dimension 0")
        n = {int(t.shape[0]) if t.ndim else -1 for t in obj}
        if len(n) != 1 or n == {-1}:
            raise FactoryError(f"{what} returned tensors whose leading dimensions differ ({sorted(n)}); "
                               f"every tensor must hold the same samples along dimension 0")
        if n == {0}:
            raise FactoryError(f"{what} returned tensors with 0 samples; it must return the training data")
        return obj
    if isinstance(obj, torch.utils.data.DataLoader):
        try:
            empty = len(obj) == 0
        except TypeError:  # iterable-style dataset: cannot tell without iterating
            empty = False
        if empty:
            raise FactoryError(f"{what} returned an empty DataLoader (0 batches); it must yield the training data")
        return obj
    if isinstance(obj, torch.utils.data.Dataset):
        try:
            empty = len(obj) == 0  # type: ignore[arg-type]
        except TypeError:
            empty = False
        if empty:
            raise FactoryError(f"{what} returned an empty Dataset (0 samples); it must return the training data")
        return obj
    raise FactoryError(
        f"{what} returned a {type(obj).__name__}; it must return a Dataset, a DataLoader, a tensor or a "
        f"tuple of tensors (or a LightningDataModule)"
    )


def _batch_loss(out: Any, source: str) -> Tensor:
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, Tensor) or out.numel() != 1:
        raise FactoryError(
            f"{source} must return a scalar loss tensor (or a dict with 'loss'), got {type(out).__name__}; "
            f"define devinterp_loss(batch) on the module or pass --loss package.module:fn"
        )
    return out.reshape(())


def module_loss(model: nn.Module, batch: Any) -> Tensor:
    """``loss_fn(model, batch)`` that asks the module: ``devinterp_loss(batch)`` if it defines one,
    else ``training_step(batch, 0)`` (its loss, or the ``"loss"`` of the dict it returns).

    Calls of ``self.log`` inside ``training_step`` are silenced (there is no trainer).
    """
    hook = getattr(model, "devinterp_loss", None)
    if callable(hook):
        return _batch_loss(hook(batch), f"{type(model).__name__}.devinterp_loss")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        warnings.filterwarnings("ignore", message=".*trainer.*reference.*")
        out = model.training_step(batch, 0)
    return _batch_loss(out, f"{type(model).__name__}.training_step")


def loss_from_module(model: nn.Module) -> Callable[[nn.Module, Any], Tensor] | None:
    """:func:`module_loss` if ``model`` defines ``devinterp_loss`` or ``training_step``, else None."""
    if callable(getattr(model, "devinterp_loss", None)):
        return module_loss
    step = getattr(type(model), "training_step", None)
    if step is None:
        return None
    try:  # LightningModule.training_step itself is only a stub that raises: not a loss
        from lightning.pytorch import LightningModule

        if step is LightningModule.training_step:
            return None
    except ImportError:
        pass
    return module_loss
