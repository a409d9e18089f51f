"""Folders of HuggingFace checkpoints: ``SnapshotStore.from_hf_checkpoints`` and ``devinterp analyze``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from client_models import VOCAB, needs_hf, tiny_gpt2, tiny_neox

from devinterp.analyses import induction_scores, lm_loss
from devinterp.cli import main
from devinterp.data import repeated_tokens
from devinterp.errors import StoreNotFoundError
from devinterp.store import SnapshotStore
from devinterp.tensorboard import read_scalars

pytestmark = needs_hf
STEPS = (0, 4, 8)


def _train_and_save(model, root, naming: str, steps=STEPS) -> dict[int, dict]:
    """Train a few Adam steps, writing a checkpoint folder at every step in ``steps``."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    saved = {}
    for i in range(max(steps) + 1):
        if i in steps:
            folder = root / naming.format(i)
            model.save_pretrained(folder)
            if naming.startswith("run"):  # no step in the name: the trainer state says
                (folder / "trainer_state.json").write_text(json.dumps({"global_step": i}))
            saved[i] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        loss = lm_loss(model, repeated_tokens(VOCAB, 16, 8, seed=i))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return saved


@pytest.fixture(scope="module")
def trainer_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_run")
    saved = _train_and_save(tiny_gpt2(n_ctx=16), root, "checkpoint-{}")
    (root / "runs").mkdir()  # what the Trainer also writes: ignored
    return root, saved


def test_store_over_trainer_checkpoints(trainer_folder):
    root, saved = trainer_folder
    store = SnapshotStore.from_hf_checkpoints(root)
    assert store.steps() == list(STEPS)
    assert SnapshotStore.open(root).steps() == list(STEPS)
    info = store.run_info()
    assert info["format"] == "hf-checkpoints" and info["hparams"]["vocab_size"] == VOCAB
    model = tiny_gpt2(n_ctx=16, seed=5)
    for step in STEPS:
        snap = store.load_into(model, step)
        assert snap.step == step
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, saved[step][k])
    assert store.verify().ok


@pytest.mark.parametrize("naming", ["step{}", "step-{}", "run_{}"])
def test_save_pretrained_series_and_renamed_keys(tmp_path, naming):
    # GPT-NeoX stores its unembedding as embed_out: loading goes through transformers' renaming
    saved = _train_and_save(tiny_neox(n_ctx=16), tmp_path, naming, steps=(0, 3))
    store = SnapshotStore.from_hf_checkpoints(tmp_path)
    assert store.steps() == [0, 3]
    model = tiny_neox(n_ctx=16, seed=9)
    store.load_into(model, 3)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved[3][k])


def test_pytorch_model_bin_and_errors(tmp_path):
    model = tiny_gpt2(n_ctx=16)
    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    store = SnapshotStore.from_hf_checkpoints(tmp_path)
    assert store.steps() == [7]
    torch.testing.assert_close(store.load(7).state_dict["transformer.wte.weight"], model.transformer.wte.weight)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreNotFoundError, match="checkpoint-<step>"):
        SnapshotStore.from_hf_checkpoints(tmp_path / "empty")


def test_analyze_writes_the_scores_induction_scores_gives(trainer_folder, tmp_path):
    root, saved = trainer_folder
    out = tmp_path / "analysis"
    rc = main(["analyze", str(root), "--circuits", "--no-progress", "--out", str(out)])
    assert rc == 0
    curves = read_scalars(out)
    model = tiny_gpt2(n_ctx=16)
    for step in STEPS:
        model.load_state_dict(saved[step])
        # what CircuitCallback would log online for this model
        direct = induction_scores(model, vocab_size=VOCAB, seq_len=16, num_sequences=32, seed=0,
                                  copying=False).scalars()
        for tag in ("induction/L1H2", "previous_token/L0H0", "induction/max"):
            steps, values = curves[tag]
            assert np.isclose(values[list(steps).index(step)], direct[tag], atol=1e-6), tag
