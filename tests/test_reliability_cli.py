"""Nothing a user did is lost, and every bad input is one line: the CLI, the demo re-run, partial damage."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from _posthoc_helpers import make_run
from _posthoc_helpers import subprocess_env as _env

from devinterp.cli import main
from devinterp.errors import CorruptSnapshotError, InvalidInputError, OutputExistsError
from devinterp.store import SnapshotStore

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"devinterp {command}: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    return errors[0]


def _weights(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(8, 8, generator=g)}


def _store(root: Path, steps=(0, 1, 2, 3)) -> Path:
    with SnapshotStore(root, mode="a") as s:
        for step in steps:
            s.save(step, _weights(step), {"epoch": 0})
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("reliability"))


# ---- the store: snapshots marks damage, verify --repair, garbled index -------------------------

def test_snapshots_marks_missing_and_truncated_files(tmp_path, capsys):
    root = _store(tmp_path / "s")
    (root / "snapshots/step_000000000001.safetensors").unlink()
    f = root / "snapshots/step_000000000002.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    code, out, err = _run(capsys, "snapshots", str(root))
    assert code == 1
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert "MISSING" in rows["1"] and "TRUNCATED (50 of" in rows["2"]
    assert "MISSING" not in rows["0"] + rows["3"] and "TRUNCATED" not in rows["0"] + rows["3"]
    assert "devinterp verify" in err
    code, out, _ = _run(capsys, "snapshots", str(root), "--json")
    status = {json.loads(line)["step"]: json.loads(line)["status"] for line in out.splitlines()}
    assert code == 1 and status[0] == "ok" and status[1] == "missing" and status[2].startswith("truncated")


def test_garbled_middle_index_line_names_the_line_and_repair_rebuilds(tmp_path, capsys):
    root = _store(tmp_path / "s")
    index = root / "index.jsonl"
    lines = index.read_text().splitlines()
    lines[1] = lines[1][:25] + "#garbled#"  # step 1's record
    index.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorruptSnapshotError, match=r"line 2 .*devinterp verify --repair"):
        SnapshotStore(root)
    code, _, err = _run(capsys, "analyze", str(root), "--analysis", "_posthoc_helpers:WeightNorm")
    assert code == 1 and "line 2" in _one_error_line(err, "analyze") and "--repair" in err
    # one more problem: step 3's file is truncated (it must be left out, not deleted)
    f3 = root / "snapshots/step_000000000003.safetensors"
    f3.write_bytes(f3.read_bytes()[:-10])
    files_before = sorted(p.name for p in (root / "snapshots").iterdir())
    code, out, err = _run(capsys, "verify", "--repair", str(root))
    assert "1 recovered" in out and "left out" in out and "step_000000000003" in out
    store = SnapshotStore(root)
    assert store.steps() == [0, 1, 2] and store.verify().ok and code == 0
    assert store.meta(1)["recovered"] is True and store.meta(0)["epoch"] == 0  # kept records keep their meta
    assert torch.equal(store.load(1).state_dict["w"], _weights(1)["w"])
    assert sorted(p.name for p in (root / "snapshots").iterdir()) == files_before  # nothing deleted
    backups = list(root.glob("index.jsonl.damaged-*"))
    assert len(backups) == 1 and "#garbled#" in backups[0].read_text()


def test_verify_lists_every_problem(tmp_path, capsys):
    root = _store(tmp_path / "s")
    (root / "snapshots/step_000000000000.safetensors").unlink()
    f = root / "snapshots/step_000000000002.safetensors"
    f.write_bytes(b"x" * f.stat().st_size)
    code, out, err = _run(capsys, "verify", str(root))
    assert code == 1 and "2 problem(s)" in out
    assert "step_000000000000" in out and "step_000000000002" in out and "--repair" in err


# ---- one-line errors and exit statuses -----------------------------------------------------------

def test_file_where_a_folder_is_expected(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    for argv in (["snapshots", str(f)], ["verify", str(f)], ["analyze", str(f)], ["report", str(f)]):
        code, _, err = _run(capsys, *argv)
        assert code == 2, (argv, err)
        assert "is a file, not a folder" in _one_error_line(err, argv[0])
    root = _store(tmp_path / "s")
    code, _, err = _run(capsys, "analyze", str(root), "--out", str(f), "--analysis", "_posthoc_helpers:WeightNorm")
    assert code == 2 and "--out" in _one_error_line(err, "analyze") and "is a file" in err
    code, _, err = _run(capsys, "demo", "--out", str(f))
    assert code == 2 and "is a file" in _one_error_line(err, "demo")


def test_accelerator_checks(tmp_path, capsys):
    root = _store(tmp_path / "s")
    code, _, err = _run(capsys, "analyze", str(root), "--accelerator", "tpu9")
    assert code == 2 and "tpu9" in _one_error_line(err, "analyze") and "cpu" in err
    if not torch.cuda.is_available():
        code, _, err = _run(capsys, "analyze", str(root), "--accelerator", "cuda")
        line = _one_error_line(err, "analyze")
        assert code == 2 and "no CUDA device" in line and "--accelerator cpu" in line
        code, _, err = _run(capsys, "calibrate", "--problem", "dln:2,2:r=1", "--device", "cuda")
        assert code == 2 and "no CUDA device" in _one_error_line(err, "calibrate")


def test_empty_steps_and_unknown_transition_metric(run_dir, tmp_path, capsys):
    store = str(run_dir / "store")
    code, _, err = _run(capsys, "analyze", store, "--steps", "", "--analysis", "_posthoc_helpers:WeightNorm")
    assert code == 2 and "--steps is empty" in _one_error_line(err, "analyze")
    assert not (run_dir / "store" / "analysis").exists()  # checked before any work
    code, out, err = _run(capsys, "analyze", store, "--analysis", "_posthoc_helpers:WeightNorm", "--transitions",
                          "--transition-metrics", "llc/mean,nrom/total", "--out", str(tmp_path / "o"),
                          "--no-progress", "--no-tensorboard")
    assert code == 1, err
    assert "--transition-metrics llc/mean,nrom/total: no such curve" in err and "norm/total" in err


def test_broken_pipe_is_quiet(tmp_path):
    root = _store(tmp_path / "s")
    proc = subprocess.Popen([sys.executable, "-m", "devinterp", "snapshots", str(root)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line (as `| head -0` would)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_step_size_must_be_positive():
    from devinterp.analyses import estimate_llc

    model = torch.nn.Linear(2, 1)
    data = (torch.randn(16, 2), torch.randn(16, 1))

    def loss(m, batch):
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

    for bad in (0, 0.0, -1e-3, float("nan")):
        with pytest.raises(InvalidInputError, match="step_size must be a finite number > 0"):
            estimate_llc(model, data, loss, step_size=bad, num_chains=1, num_draws=2, num_burnin=0)


def test_induction_scores_input_checks():
    from devinterp.analyses import induction_scores
    from devinterp.errors import DevinterpWarning
    from devinterp.models import AttentionOnlyTransformer

    model = AttentionOnlyTransformer(vocab_size=16, n_layers=1, n_heads=2, d_model=16, n_ctx=32)
    with pytest.raises(InvalidInputError, match=r"vocab_size=40 is larger than the model's vocabulary \(16"):
        induction_scores(model, vocab_size=40, seq_len=16, copying=False)
    with pytest.raises(InvalidInputError, match=r"seq_len=64 is longer than the model's context \(32"):
        induction_scores(model, vocab_size=16, seq_len=64, copying=False)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(InvalidInputError, match="cannot be run on token ids"):
        induction_scores(mlp, vocab_size=8, seq_len=16)
    with pytest.warns(DevinterpWarning, match="vocab_size=4 gives fewer distinct tokens"):
        induction_scores(model, vocab_size=4, seq_len=32, copying=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DevinterpWarning)  # enough tokens: no warning
        induction_scores(model, vocab_size=16, seq_len=32, copying=False)


# ---- re-runs keep user data ---------------------------------------------------------------------

def _fake_demo(out: Path) -> None:
    from devinterp.demo import prepare_output

    prepare_output(out)
    _store(out / "snapshots", steps=(0, 1))
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"ev")
    (out / "summary.json").write_text("{}")


def test_demo_rerun_keeps_user_results(tmp_path, capsys):
    from devinterp.demo import prepare_output

    out = tmp_path / "demo"
    _fake_demo(out)
    user = out / "snapshots" / "analysis" / "results.jsonl"  # what `devinterp analyze` wrote there
    user.parent.mkdir()
    user.write_text('{"analysis": "llc"}\n')
    mine = out / "my_notes.md"
    mine.write_text("notes")
    with pytest.raises(OutputExistsError, match=r"--force.*|another --out") as info:
        prepare_output(out)
    assert "snapshots/analysis/results.jsonl" in str(info.value) or "my_notes.md" in str(info.value)
    assert user.read_text() == '{"analysis": "llc"}\n' and (out / "summary.json").exists()  # nothing changed
    code, _, err = _run(capsys, "demo", "--out", str(out), "--quick")
    assert code == 2 and "--force" in _one_error_line(err, "demo") and user.exists()
    said = []
    prepare_output(out, force=True, echo=said.append)
    kept = list(out.glob("previous-*/snapshots/analysis/results.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == '{"analysis": "llc"}\n' and said
    assert mine.read_text() == "notes"  # outside the demo's folders: left where it is
    assert not (out / "summary.json").exists() and not (out / "snapshots" / "index.jsonl").exists()
    assert not list((out / "tensorboard").glob("events.*"))


def test_analyze_does_not_overwrite_foreign_tables(tmp_path, capsys):
    root = _store(tmp_path / "s")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.csv").write_text("my,own,table\n")
    code, _, err = _run(capsys, "analyze", str(root), "--analysis", "_posthoc_helpers:WeightNorm", "--out", str(out))
    assert code == 2 and "another --out" in _one_error_line(err, "analyze")
    assert (out / "results.csv").read_text() == "my,own,table\n"


# ---- partial damage, partial results ------------------------------------------------------------

def test_damaged_step_zero_snapshot_the_rest_is_analysed(run_dir, tmp_path, capsys):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(run_dir / "store", store)
    first = store / "snapshots" / "step_000000000000.safetensors"
    first.write_bytes(first.read_bytes()[:-7])
    code, out, err = _run(capsys, "analyze", str(store), "--analysis", "_posthoc_helpers:WeightNorm",
                          "--no-progress", "--no-tensorboard")
    assert code == 1, err
    assert "damaged: step 0" in err and "step_000000000000" in err
    from devinterp.posthoc import ResultsFile

    recs = ResultsFile(store / "analysis" / "results.jsonl").read()
    ok = sorted(r.step for r in recs if r.ok)
    assert ok == SnapshotStore(store).steps()[1:]  # every healthy snapshot


def test_checkpoint_folder_with_one_truncated_ckpt(run_dir, tmp_path, capsys):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(run_dir / "ckpt", folder)
    names = sorted(p.name for p in folder.glob("*.ckpt"))
    victim = folder / names[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    code, out, err = _run(capsys, "analyze", str(folder), "--analysis", "_posthoc_helpers:WeightNorm",
                          "--model", "_snapshot_models:TinyModule", "--no-progress", "--no-tensorboard")
    assert code == 1, err
    assert f"damaged: {names[0]}" in err
    from devinterp.posthoc import ResultsFile

    recs = ResultsFile(folder / "devinterp-analysis" / "results.jsonl").read()
    assert len({r.step for r in recs if r.ok}) == len(names) - 1


# ---- distributed: the same one-line error and exit status on every rank -------------------------

@pytest.mark.slow  # two processes: about 90 s on a loaded 2-core machine
def test_two_processes_fail_cleanly_with_one_line(run_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "devinterp", "analyze", str(run_dir / "store"), "--analysis",
         "_posthoc_helpers:bad_input_at_9", "--devices", "2", "--out", str(tmp_path / "o"), "--no-progress",
         "--no-tensorboard"], env=_env(POSTHOC_BAD_STEP="9"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "terminate called" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    line = _one_error_line(proc.stderr, "analyze")
    assert "option does not fit the model at step 9" in line


def test_circuit_options_checked_before_any_snapshot_is_analysed(tmp_path, capsys):
    from devinterp.models import AttentionOnlyTransformer

    hp = dict(vocab_size=16, n_layers=1, n_heads=2, d_model=16, n_ctx=32)
    root = tmp_path / "s"
    with SnapshotStore(root, mode="a") as s:
        s.write_run(model_class=AttentionOnlyTransformer, hparams=hp)
        for step in (0, 1, 2):
            s.save(step, AttentionOnlyTransformer(**hp).state_dict())
    code, _, err = _run(capsys, "analyze", str(root), "--circuits", "--seq-len", "64", "--no-progress")
    line = _one_error_line(err, "analyze")
    assert code == 2 and "seq_len=64 is longer than the model's context (32" in line
    code, _, err = _run(capsys, "analyze", str(root), "--circuits", "--vocab-size", "99", "--no-progress")
    assert code == 2 and "vocab_size=99 is larger" in _one_error_line(err, "analyze")
    results = root / "analysis" / "results.jsonl"
    assert not results.exists() or results.read_text() == ""  # nothing was computed


def test_second_analyze_on_the_same_results_folder_is_refused(run_dir, tmp_path, capsys):
    import time

    root = run_dir / "store"
    out = tmp_path / "out"
    out.mkdir()
    (out / "writer.lock").write_text(json.dumps({"pid": 4321, "host": "node-2", "started": time.time(),
                                                 "purpose": "devinterp analyze", "token": "t"}))
    code, _, err = _run(capsys, "analyze", str(root), "--analysis", "_posthoc_helpers:WeightNorm", "--out", str(out),
                        "--no-progress")
    line = _one_error_line(err, "analyze")
    assert code == 1 and "pid 4321 on host node-2" in line and "another --out" in line
    assert not (out / "results.jsonl").exists()
    (out / "writer.lock").unlink()
    assert _run(capsys, "analyze", str(root), "--analysis", "_posthoc_helpers:WeightNorm", "--out", str(out),
                "--no-progress", "--no-tensorboard")[0] == 0
    assert not (out / "writer.lock").exists()  # released at the end
