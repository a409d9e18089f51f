import json
import uuid
from pathlib import Path

import pytest
import torch
from _snapshot_models import TinyModule, loader, trainer
from torch import nn

from devinterp.errors import (
    CorruptSnapshotError,
    EmptyStoreError,
    InvalidInputError,
    SnapshotNotFoundError,
    StateDictMismatchError,
    StoreError,
    StoreNotFoundError,
)
from devinterp.store import BackgroundSaver, SnapshotStore, snapshot_filename


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(3, generator=g),
            "n.running": torch.arange(5, dtype=torch.int64) + seed}


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return f"memory://devinterp-test-{uuid.uuid4().hex}"


def _local(tmp_path: Path) -> tuple[str, SnapshotStore]:
    root = str(tmp_path / "store")
    store = SnapshotStore(root, mode="a")
    for step in (0, 1, 5, 20):
        store.save(step, _weights(step), {"epoch": step // 5, "train_loss": 1.0 / (step + 1)})
    return root, store


def test_round_trip_and_queries(root):
    writer = SnapshotStore(root, mode="a")
    for step in (10, 0, 3):  # written out of order, read in step order
        writer.save(step, _weights(step), {"epoch": step, "samples_seen": 8 * step, "note": "x"})
    store = SnapshotStore(root)
    assert store.steps() == [0, 3, 10] and len(store) == 3
    assert 3 in store and 4 not in store
    assert [s.step for s in store] == [0, 3, 10]
    snap = store.load(3)
    for k, v in _weights(3).items():
        assert torch.equal(snap.state_dict[k], v) and snap.state_dict[k].dtype == v.dtype
    assert snap.meta["epoch"] == 3 and snap.meta["samples_seen"] == 24 and snap.meta["note"] == "x"
    assert snap.meta["file"] == snapshot_filename(3) == "snapshots/step_000000000003.safetensors"
    assert len(snap.meta["sha256"]) == 64 and snap.meta["bytes"] > 0
    assert store.latest().step == 10
    with pytest.raises(TypeError):
        snap.meta["epoch"] = 0  # read-only
    assert store.verify().ok


def test_file_names_sort_by_step():
    names = [snapshot_filename(s) for s in (0, 9, 10, 100, 12345, 10**11)]
    assert names == sorted(names)


def test_run_file(tmp_path):
    store = SnapshotStore(tmp_path / "s", mode="a")
    info = store.write_run(model_class=TinyModule, hparams={"width": 8, "path": tmp_path, "t": torch.tensor(2.0)},
                           extra={"schedule": "every(5)"})
    first = SnapshotStore(tmp_path / "s").run_info()
    assert first == json.loads(json.dumps(info))
    assert first["model_class"] == "_snapshot_models:TinyModule"
    assert first["hparams"] == {"width": 8, "path": str(tmp_path), "t": 2.0}
    assert first["format_version"] == 1 and "torch" in first["versions"]
    again = store.write_run(model_class="x.y:Z")
    assert again["created"] == first["created"] and again["model_class"] == "x.y:Z"


def test_bad_input_errors(tmp_path):
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        SnapshotStore(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreNotFoundError, match="holds no snapshot store"):
        SnapshotStore(tmp_path / "plain")
    empty = SnapshotStore(tmp_path / "empty", mode="a")
    empty.write_run()
    reader = SnapshotStore(tmp_path / "empty")
    assert reader.steps() == [] and len(reader) == 0
    with pytest.raises(EmptyStoreError):
        reader.latest()
    with pytest.raises(EmptyStoreError):
        reader.load(0)
    root, store = _local(tmp_path)
    with pytest.raises(SnapshotNotFoundError, match=r"step 4 .*nearby steps: \[0, 1, 5, 20\]"):
        store.load(4)
    with pytest.raises(StoreError, match="read-only"):
        SnapshotStore(root).save(30, _weights(0))
    with pytest.raises(InvalidInputError, match="reserved"):
        store.save(30, _weights(0), {"sha256": "x"})
    with pytest.raises(InvalidInputError, match="non-negative"):
        store.save(-1, _weights(0))
    with pytest.raises(InvalidInputError, match="not tensors"):
        store.save(31, {"a": 1.0})
    with pytest.raises(InvalidInputError, match="mode"):
        SnapshotStore(root, mode="w")


def test_torn_last_index_line_is_ignored_then_repaired(tmp_path):
    root, first = _local(tmp_path)
    first.close()  # one writer at a time
    index = Path(root) / "index.jsonl"
    full = index.read_bytes()
    index.write_bytes(full + b'{"kind":"snapshot","step":99,"fi')  # crash mid-append
    store = SnapshotStore(root)
    assert store.steps() == [0, 1, 5, 20]
    report = store.verify()
    assert report.ok and any("torn" in n.message for n in report.notes)
    writer = SnapshotStore(root, mode="a")
    writer.save(30, _weights(30))  # the writer cuts the torn tail before appending
    assert SnapshotStore(root).steps() == [0, 1, 5, 20, 30]
    assert index.read_bytes().startswith(full) and index.read_bytes().endswith(b"\n")


def test_complete_last_line_without_newline_counts(tmp_path):
    root, first = _local(tmp_path)
    first.close()  # one writer at a time
    index = Path(root) / "index.jsonl"
    index.write_bytes(index.read_bytes().rstrip(b"\n"))
    assert SnapshotStore(root).steps() == [0, 1, 5, 20]
    SnapshotStore(root, mode="a").save(30, _weights(30))
    assert SnapshotStore(root).steps() == [0, 1, 5, 20, 30]


def test_garbage_inside_index_is_an_error(tmp_path):
    root, _ = _local(tmp_path)
    index = Path(root) / "index.jsonl"
    lines = index.read_bytes().split(b"\n")
    lines.insert(1, b"garbage")
    index.write_bytes(b"\n".join(lines))
    with pytest.raises(CorruptSnapshotError, match="line 2"):
        SnapshotStore(root)


def test_orphan_and_temp_files_are_ignored(tmp_path):
    root, _ = _local(tmp_path)
    snaps = Path(root) / "snapshots"
    (snaps / ".step_000000000030.safetensors.tmp-123-abcd").write_bytes(b"partial")
    (snaps / "step_000000000040.safetensors").write_bytes(b"never indexed")
    store = SnapshotStore(root)
    assert store.steps() == [0, 1, 5, 20]
    report = store.verify()
    assert report.ok and report.checked == 4
    noted = {n.file for n in report.notes}
    assert noted == {"snapshots/.step_000000000030.safetensors.tmp-123-abcd", "snapshots/step_000000000040.safetensors"}


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_file_is_named_never_skipped(tmp_path, damage):
    root, _ = _local(tmp_path)
    path = Path(root) / snapshot_filename(5)
    data = path.read_bytes()
    if damage == "flip":
        path.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.unlink()
    store = SnapshotStore(root)
    assert store.steps() == [0, 1, 5, 20]  # still listed: never silently dropped
    with pytest.raises(CorruptSnapshotError, match="step_000000000005.safetensors"):
        store.load(5)
    with pytest.raises(CorruptSnapshotError):
        list(store)
    report = store.verify()
    assert not report.ok and [p.file for p in report.problems] == [snapshot_filename(5)]
    assert store.load(20).step == 20


def test_unreadable_file_without_checksum_is_corrupt(tmp_path):
    root, _ = _local(tmp_path)
    index = Path(root) / "index.jsonl"
    recs = [json.loads(x) for x in index.read_text().splitlines()]
    for r in recs:
        r.pop("sha256"), r.pop("bytes")
    index.write_text("".join(json.dumps(r) + "\n" for r in recs))
    (Path(root) / snapshot_filename(1)).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}     ")
    with pytest.raises(CorruptSnapshotError, match="step_000000000001.safetensors.*safetensors"):
        SnapshotStore(root).load(1)


def test_tied_and_shared_tensors(root):
    model = TinyModule(tied=True)
    assert model.dec.weight is model.inp.weight
    flat = torch.arange(12.0)
    extra = {"view_a": flat[:6], "view_b": flat[6:]}  # shared storage, different views
    store = SnapshotStore(root, mode="a")
    store.save(1, {**model.state_dict(), **extra})
    snap = SnapshotStore(root).load(1)
    assert snap.state_dict["dec.weight"] is snap.state_dict["inp.weight"]  # alias restored
    assert torch.equal(snap.state_dict["view_b"], flat[6:])
    fresh = TinyModule(tied=True)
    store.save(2, model.state_dict())
    SnapshotStore(root).load_into(fresh, 2)
    assert fresh.dec.weight is fresh.inp.weight
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_load_into_lists_every_mismatch(tmp_path):
    store = SnapshotStore(tmp_path / "s", mode="a")
    store.save(0, TinyModule(width=8).state_dict())
    wrong = nn.ModuleDict({"inp": nn.Linear(4, 6), "other": nn.Linear(2, 2)})
    with pytest.raises(StateDictMismatchError) as info:
        store.load_into(wrong, 0)
    msg = str(info.value)
    for needle in ("out.weight", "other.weight", "other.bias", "inp.weight: snapshot (8, 4) vs model (6, 4)",
                   "inp.bias: snapshot (8,) vs model (6,)", "step_000000000000.safetensors"):
        assert needle in msg
    right = TinyModule(width=8)
    assert store.load_into(right, 0).step == 0


def test_supersession_is_append_only(root):
    store = SnapshotStore(root, mode="a")
    for step in (0, 1, 2, 3, 4):
        store.save(step, _weights(step))
    store.save(2, _weights(100))  # same step again: the later record wins
    assert torch.equal(SnapshotStore(root).load(2).state_dict["a.weight"], _weights(100)["a.weight"])
    assert store.truncate_after(2) == [3, 4]
    assert store.truncate_after(2) == []  # nothing more to supersede: no record written
    store.save(4, _weights(400))
    reader = SnapshotStore(root)
    assert reader.steps() == [0, 1, 2, 4]
    assert torch.equal(reader.load(4).state_dict["a.weight"], _weights(400)["a.weight"])
    kinds = [json.loads(x)["kind"] for x in reader._fs.read("index.jsonl").decode().splitlines()]
    assert kinds == ["snapshot"] * 5 + ["drop", "snapshot", "truncate", "snapshot"]
    assert reader.verify().ok


def test_background_saver_orders_and_reports_errors(tmp_path):
    store = SnapshotStore(tmp_path / "s", mode="a")
    saver = BackgroundSaver(store, max_pending_bytes=1)
    for step in range(5):
        saver.submit(step, _weights(step), {"epoch": 0})
    saver.flush()
    assert SnapshotStore(tmp_path / "s").steps() == [0, 1, 2, 3, 4]
    saver.submit(9, {"bad": 3}, None)  # not a tensor: fails in the worker
    with pytest.raises(StoreError, match="not tensors"):
        saver.flush()
    saver.close()


def test_from_lightning_checkpoints(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, save_last=True)
    model = TinyModule(width=5, lr=0.1)
    trainer(tmp_path, 9, [ckpt]).fit(model, loader())
    store = SnapshotStore.from_lightning_checkpoints(tmp_path / "ckpt")
    assert store.steps() == [3, 6, 9]  # last.ckpt duplicates step 9 and counts once
    assert store.meta(9)["file"] == "epoch=1-step=9.ckpt" and store.meta(9)["also"] == ["last.ckpt"]
    assert store.run_info()["hparams"] == {"width": 5, "lr": 0.1, "tied": False}
    fresh = TinyModule(**store.run_info()["hparams"])
    store.load_into(fresh, 9)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    assert not torch.equal(store.load(3).state_dict["inp.weight"], model.inp.weight)
    assert SnapshotStore.open(tmp_path / "ckpt").steps() == [3, 6, 9]
    assert store.verify().ok and store.verify().checked == 3
    with pytest.raises(StoreNotFoundError, match="from_lightning_checkpoints"):
        SnapshotStore(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "broken.ckpt").write_bytes(b"not a checkpoint")
    # one damaged file is left out and named; the others stay readable
    partial = SnapshotStore.from_lightning_checkpoints(tmp_path / "ckpt")
    assert partial.steps() == [3, 6, 9]
    assert [p.file for p in partial.damaged()] == ["broken.ckpt"]
    report = partial.verify()
    assert not report.ok and any("broken.ckpt" in str(p) for p in report.problems)
    with pytest.raises(StoreNotFoundError):
        SnapshotStore.from_lightning_checkpoints(tmp_path / "missing")
