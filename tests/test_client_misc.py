"""Small contracts of issue 12: exported names, optional imports, the --model hint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from devinterp.errors import FactoryError
from devinterp.factories import build_model

ROOT = Path(__file__).resolve().parents[1]


def test_head_params_name_is_the_function_after_the_module_was_imported():
    import devinterp.analyses.circuits  # noqa: F401  (imports the head_params module)
    from devinterp.analyses import head_params
    from devinterp.analyses.head_params import head_params as from_module

    assert callable(head_params) and head_params is from_module


def test_optional_libraries_are_not_imported():
    code = ("import devinterp, devinterp.analyses, devinterp.callbacks, devinterp.store, devinterp.hf\n"
            "import devinterp.analyses.circuits, devinterp.analyses.sampling, devinterp.analyses.losses\n"
            "from devinterp.analyses import ModuleAttention, lm_loss, induction_scores\n"
            "import sys\n"
            "assert not {'transformers', 'transformer_lens'} & set(sys.modules), 'imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_model_factory_error_names_model_flag_with_an_example():
    class NeedsRecipe(nn.Module):
        def __init__(self, recipe):
            super().__init__()

    with pytest.raises(FactoryError, match=r"--model package\.module:factory, e\.g\. --model mypkg"):
        build_model(NeedsRecipe, {})
