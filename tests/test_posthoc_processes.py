"""Post-hoc runs in real processes: SIGKILL then resume, Ctrl-C, and 2 processes (gloo) = 1 process."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _posthoc_helpers import make_run
from _posthoc_helpers import subprocess_env as _env

from devinterp.posthoc import ResultsFile, analyze
from devinterp.store import SnapshotStore

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _default_sigint() -> None:
    # A background job of a non-interactive shell inherits SIGINT ignored, and Python then never
    # raises KeyboardInterrupt: give the child the default disposition, as a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "devinterp", "analyze", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_default_sigint)


def _result_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _wait_for_lines(proc: subprocess.Popen, path: Path, n: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while _result_lines(path) < n and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    assert _result_lines(path) >= n


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("posthoc_proc"))


def _computed(log: Path) -> list[int]:
    return [int(line.split()[0]) for line in log.read_text().splitlines()] if log.exists() else []


def test_sigkill_midway_then_resume(run_dir, tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "computed.txt"
    env = _env(POSTHOC_SLEEP="0.25", POSTHOC_LOG=str(log))
    args = (str(run_dir / "store"), "--analysis", "_posthoc_helpers:slow_norm", "--out", str(out), "--no-progress")
    proc = _cli(*args, env=env)
    _wait_for_lines(proc, out / "results.jsonl", 3)
    time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {r.step for r in ResultsFile(out / "results.jsonl").read()}
    before = len(_computed(log))
    assert 3 <= len(finished) < 9
    proc = _cli(*args, env=env)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    again = _computed(log)[before:]
    assert not finished & set(again), "a finished snapshot was computed again"
    recs = ResultsFile(out / "results.jsonl").read()
    steps = SnapshotStore(run_dir / "store").steps()
    assert sorted(r.step for r in recs) == steps  # nothing lost, nothing twice
    assert f"{len(steps) - len(finished)} computed" in stdout


def test_ctrl_c_stops_cleanly_and_keeps_finished_work(run_dir, tmp_path):
    out = tmp_path / "out"
    env = _env(POSTHOC_SLEEP="0.3")
    proc = _cli(str(run_dir / "store"), "--analysis", "_posthoc_helpers:slow_norm", "--out", str(out),
                "--no-progress", env=env)
    _wait_for_lines(proc, out / "results.jsonl", 2)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted; finished work is kept" in stderr
    assert "Traceback" not in stderr
    data = (out / "results.jsonl").read_bytes()
    assert data.endswith(b"\n")  # whole lines only
    recs = ResultsFile(out / "results.jsonl").read()
    assert len(recs) >= 2 and len({r.step for r in recs}) == len(recs)


def test_two_processes_give_the_same_results_as_one(run_dir, tmp_path):
    has_llc = importlib.util.find_spec("devinterp.analyses.llc") is not None
    llc_args = ["--llc", "--llc-chains", "2", "--llc-draws", "20", "--llc-burnin", "5",
                "--llc-step-size", "1e-3", "--data", "_posthoc_helpers:tiny_data"] if has_llc else []
    proc = subprocess.run(
        [sys.executable, "-m", "devinterp", "analyze", str(run_dir / "store"), "--analysis",
         "_posthoc_helpers:WeightNorm", *llc_args, "--devices", "2", "--out", str(tmp_path / "two"),
         "--no-progress"], env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    two = ResultsFile(tmp_path / "two" / "results.jsonl").read()
    assert {r.meta["rank"] for r in two} == {0, 1}  # both processes worked
    analyses = [__import__("_posthoc_helpers").WeightNorm()]
    if has_llc:
        from devinterp.posthoc import LLCAnalysis

        analyses.append(LLCAnalysis(num_chains=2, num_draws=20, num_burnin=5, step_size=1e-3))
    analyze(run_dir / "store", analyses, data="_posthoc_helpers:tiny_data" if has_llc else None,
            out_dir=str(tmp_path / "one"))
    one = ResultsFile(tmp_path / "one" / "results.jsonl").read()
    assert len(one) == len(two) == 9 * len(analyses)
    by_key = {r.key: r.scalars for r in one}
    for r in two:
        assert r.scalars == by_key[r.key], (r.key, r.scalars, by_key[r.key])
    assert json.loads((tmp_path / "two" / "results.json").read_text()) == json.loads(
        (tmp_path / "one" / "results.json").read_text())


@pytest.mark.slow
def test_python_api_spawns_two_processes(run_dir, tmp_path):
    """``analyze(devices=2)`` from Python (ddp_spawn) gives the records of a 1-process run."""
    script = tmp_path / "spawn.py"
    script.write_text(
        "from _posthoc_helpers import WeightNorm\n"
        "from devinterp.posthoc import analyze\n"
        "if __name__ == '__main__':\n"
        f"    s = analyze({str(run_dir / 'store')!r}, [WeightNorm(scale=3.0)], out_dir={str(tmp_path / 'two')!r},\n"
        "                devices=2, transitions=False)\n"
        "    print('SUMMARY', s.computed, s.world_size)\n")
    proc = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "SUMMARY 9 2" in proc.stdout
    from _posthoc_helpers import WeightNorm

    analyze(run_dir / "store", [WeightNorm(scale=3.0)], out_dir=str(tmp_path / "one"), transitions=False)
    one = {r.key: r.scalars for r in ResultsFile(tmp_path / "one" / "results.jsonl").read()}
    two = {r.key: r.scalars for r in ResultsFile(tmp_path / "two" / "results.jsonl").read()}
    assert one == two
