import os
import subprocess
import sys
from pathlib import Path

import torch

from devinterp.cli import main
from devinterp.store import SnapshotStore, snapshot_filename

REPO = Path(__file__).resolve().parents[1]


def _store(root: Path) -> Path:
    store = SnapshotStore(root, mode="a")
    store.write_run(model_class="pkg.mod:Net")
    for step in (0, 10, 200):
        store.save(step, {"w": torch.full((256,), float(step))},
                   {"epoch": step // 100, "samples_seen": 32 * step, "train_loss": 1.0 / (step + 1)})
    return root


def test_snapshots_table(tmp_path, capsys):
    root = _store(tmp_path / "s")
    assert main(["snapshots", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "3 snapshot(s)" in out[0] and "pkg.mod:Net" in out[0]
    assert out[1].split()[:6] == ["step", "size", "epoch", "samples", "train_loss", "wall_time"]
    rows = [line.split() for line in out[2:]]
    assert [r[0] for r in rows] == ["0", "10", "200"]
    assert rows[2][3] == "2" and rows[2][4] == "6400" and rows[2][5] == "0.004975"
    assert rows[2][-1] == snapshot_filename(200)


def test_snapshots_json_and_ckpt_folder(tmp_path, capsys):
    import json

    root = _store(tmp_path / "s")
    assert main(["snapshots", "--json", str(root)]) == 0
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["step"] for r in recs] == [0, 10, 200]
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save({"global_step": 7, "epoch": 1, "state_dict": {"w": torch.ones(3)}}, ck / "a.ckpt")
    assert main(["snapshots", str(ck)]) == 0
    out = capsys.readouterr().out
    assert "1 snapshot(s)" in out and "a.ckpt" in out


def test_verify_exit_codes(tmp_path, capsys):
    root = _store(tmp_path / "s")
    assert main(["verify", str(root)]) == 0
    assert "0 problem(s)" in capsys.readouterr().out
    path = root / snapshot_filename(10)
    path.write_bytes(path.read_bytes()[:-7])
    assert main(["verify", str(root)]) == 1
    captured = capsys.readouterr()
    assert "PROBLEM snapshots/step_000000000010.safetensors" in captured.out
    assert "1 problem(s)" in captured.err
    assert main(["verify", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_entry_point_subprocess(tmp_path):
    root = _store(tmp_path / "s")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-m", "devinterp", "verify", str(root)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    (root / snapshot_filename(0)).unlink()
    res = subprocess.run([sys.executable, "-m", "devinterp", "verify", str(root)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "step_000000000000.safetensors" in res.stdout
