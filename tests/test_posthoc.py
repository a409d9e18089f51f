"""Post-hoc analysis: --steps, the results file, plan/resume/force, outputs, bad input (in-process)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _posthoc_helpers import WeightNorm, make_run
from _snapshot_models import TinyModule

from devinterp.errors import (
    EmptyStoreError,
    FactoryError,
    PlanError,
    ResultsError,
    StateDictMismatchError,
    StoreNotFoundError,
)
from devinterp.posthoc import (
    ResultRecord,
    ResultsFile,
    analyze,
    config_hash,
    derive_seed,
    parse_steps,
)
from devinterp.posthoc.plan import make_plan, shard
from devinterp.store import SnapshotStore

HERE = Path(__file__).resolve().parent

# ------------------------------------------------------------------------------------------
# a real run: SnapshotCallback store + ModelCheckpoint folder, trained once per module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("posthoc_run"))


@pytest.fixture
def store_copy(run_dir, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(run_dir / "store", dst)
    return dst


def _analyze(path, analyses, **kw):
    kw.setdefault("transitions", False)
    return analyze(path, analyses, **kw)


# ------------------------------------------------------------------------------------------
# --steps


AVAILABLE = [0, 1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000]


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, AVAILABLE),
        ("all", AVAILABLE),
        ("10", [10]),
        ("0,10,100", [0, 10, 100]),
        ("100:500", [100, 200, 500]),
        ("100:", [100, 200, 500, 1000]),
        (":3", [0, 1, 2, 3]),
        ("every:5", [0, 10, 500]),
        ("last:2", [500, 1000]),
        ("first:3", [0, 1, 2]),
        ("last:2,0", [0, 500, 1000]),
        ("log:100", AVAILABLE),
    ],
)
def test_parse_steps(spec, expected):
    assert parse_steps(spec, AVAILABLE) == expected


def test_parse_steps_log_spreads_in_log_step():
    steps = list(range(0, 10001))
    picked = parse_steps("log:10", steps)
    assert picked[0] == 0 and picked[-1] == 10000 and 8 <= len(picked) <= 10
    ratios = [math.log1p(b) - math.log1p(a) for a, b in zip(picked[1:], picked[2:], strict=False)]
    assert max(ratios) - min(ratios) < 0.15  # evenly spaced in log(step + 1)


@pytest.mark.parametrize(
    "spec, match",
    [("7", "no snapshot at step 7; nearby steps"), ("every:0", ">= 1"), ("log:x", "not an integer"),
     ("500:100", "range is empty"), ("bogus:3", "not understood"), ("2000:3000", "selects no snapshot")],
)
def test_parse_steps_errors(spec, match):
    with pytest.raises(PlanError, match=match):
        parse_steps(spec, AVAILABLE)


def test_plan_and_shard_are_deterministic():
    keys = [("a", "h1"), ("b", "h2")]
    done = {("a", 0, "h1"), ("b", 0, "h2"), ("a", 1, "h1"), ("a", 1, "old")}
    plan = make_plan([2, 0, 1], keys, done)
    assert [(i.step, i.analyses) for i in plan.pending] == [(1, ("b",)), (2, ("a", "b"))]
    assert plan.done == 3 and plan.num_tasks == 3
    assert make_plan([0, 1], keys, done, force=True).num_tasks == 4
    items = list(range(7))
    parts = [shard(items, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(parts, [])) == items


def test_seeds_and_hashes_are_stable():
    assert derive_seed(0, 10, "llc") == derive_seed(0, 10, "llc")
    assert len({derive_seed(0, 10, "llc"), derive_seed(1, 10, "llc"), derive_seed(0, 11, "llc"),
                derive_seed(0, 10, "x")}) == 4
    assert config_hash("llc", {"a": 1, "b": 2}) == config_hash("llc", {"b": 2, "a": 1})
    assert config_hash("llc", {"a": 1}) != config_hash("llc", {"a": 2})


# ------------------------------------------------------------------------------------------
# the results file


def _rec(step, value, config="c1", **kw):
    return ResultRecord("norm", step, config, scalars={"norm/total": value}, **kw)


def test_results_file_torn_tail_and_repair(tmp_path):
    f = ResultsFile(tmp_path / "results.jsonl")
    f.append([_rec(0, 1.0), _rec(1, float("nan"))])
    with open(f.path, "ab") as fh:  # a write killed half-way
        fh.write(b'{"analysis":"norm","step":2,"con')
    recs = f.read()
    assert [r.step for r in recs] == [0, 1] and math.isnan(recs[1].scalars["norm/total"])
    f2 = ResultsFile(f.path)  # a new writer cuts the torn line before appending
    f2.append([_rec(2, 3.0)])
    assert [r.step for r in ResultsFile(f.path).read()] == [0, 1, 2]
    assert all(json.loads(line) for line in f.path.read_text().splitlines())


def test_results_file_later_line_wins_and_errors_are_not_done(tmp_path):
    f = ResultsFile(tmp_path / "r.jsonl")
    f.append([_rec(0, 1.0), _rec(0, 2.0), ResultRecord("norm", 1, "c1", error="boom")])
    assert f.latest()[("norm", 0, "c1")].scalars["norm/total"] == 2.0
    assert f.done_keys() == {("norm", 0, "c1")}


def test_results_file_damaged_middle_line_is_named(tmp_path):
    path = tmp_path / "r.jsonl"
    ResultsFile(path).append([_rec(0, 1.0)])
    with open(path, "ab") as fh:
        fh.write(b"garbage\n")
    ResultsFile(path).append([_rec(1, 1.0)])
    with pytest.raises(ResultsError, match="line 2"):
        ResultsFile(path).read()


# ------------------------------------------------------------------------------------------
# end to end on a SnapshotCallback store


def test_analyze_store_resume_and_force(store_copy, tmp_path):
    log = tmp_path / "computed.txt"
    steps = SnapshotStore(store_copy).steps()
    assert len(steps) == 9  # 0, 3, ..., 24
    s1 = _analyze(store_copy, [WeightNorm(log_to=str(log))])
    assert s1.computed == 9 and s1.failed == 0 and s1.plan.done == 0
    out = store_copy / "analysis"
    recs = ResultsFile(out / "results.jsonl").read()
    assert sorted(r.step for r in recs) == steps
    # the numbers are the weight norms of the stored snapshots, loaded into the rebuilt model
    model = TinyModule()
    SnapshotStore(store_copy).load_into(model, 24)
    expected = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()) ** 0.5
    assert next(r for r in recs if r.step == 24).scalars["norm/total"] == pytest.approx(expected, rel=1e-12)
    # a second run skips everything; a narrower --steps with --force recomputes only those
    s2 = _analyze(store_copy, [WeightNorm(log_to=str(log))])
    assert s2.computed == 0 and s2.plan.done == 9
    s3 = _analyze(store_copy, [WeightNorm(log_to=str(log))], steps="last:2", force=True)
    assert s3.computed == 2
    computed = [int(line.split()[0]) for line in log.read_text().splitlines()]
    assert computed == steps + [21, 24]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 11
    # a changed configuration is a new key: computed again, and the tables show the new one
    s4 = _analyze(store_copy, [WeightNorm(scale=2.0)], steps="0:6")
    assert s4.computed == 3 and s4.plan.done == 0
    table = json.loads((out / "results.json").read_text())
    rows = {r["step"]: r for r in table["rows"]}
    assert set(rows) == set(steps)  # loss/train of every snapshot is there
    assert rows[3]["norm/total"] == pytest.approx(2 * next(r for r in recs if r.step == 3).scalars["norm/total"])
    assert "norm/total" not in rows[24]  # the scale-2 configuration has only 0..6
    assert (out / "results.csv").read_text().splitlines()[0].startswith("step,")


def test_tensorboard_events_match_results(store_copy, tmp_path):
    from devinterp.tensorboard import read_scalars

    _analyze(store_copy, [WeightNorm()], logdir=str(tmp_path / "tb"))
    _analyze(store_copy, [WeightNorm()], logdir=str(tmp_path / "tb"), steps="last:1", force=True)
    curves = read_scalars(tmp_path / "tb" / "analysis")
    files = list((tmp_path / "tb" / "analysis").glob("events.out.tfevents.*"))
    assert len(files) == 1  # the second run replaced the first run's events
    recs = ResultsFile(store_copy / "analysis" / "results.jsonl").latest()
    steps, values = curves["norm/total"]
    assert list(steps) == sorted(s for (_, s, _) in recs)
    assert np.allclose(values, [recs[("norm", int(s), next(iter(recs))[2])].scalars["norm/total"] for s in steps])
    assert "loss/train" in curves  # from the snapshots' index records


def test_failed_snapshot_is_recorded_and_retried(store_copy):
    s = _analyze(store_copy, [WeightNorm(fail_at=9)])
    assert s.computed == 8 and s.failed == 1 and "diverged on purpose" in s.errors[0]
    s2 = _analyze(store_copy, [WeightNorm(fail_at=9)])
    assert s2.plan.num_tasks == 1 and s2.failed == 1  # only the failed one is tried again


def test_corrupt_snapshot_fails_alone(store_copy):
    victim = store_copy / "snapshots" / "step_000000000012.safetensors"
    victim.write_bytes(victim.read_bytes()[:-10])
    s = _analyze(store_copy, [WeightNorm()])
    assert s.computed == 8 and s.failed == 1
    assert not s.errors  # a damaged file is not an analysis failure: it is listed as damaged
    assert [item for item, _ in s.damaged] == ["step 12"] and "truncated" in s.damaged[0][1]


def test_transitions_and_report(store_copy, tmp_path):
    pytest.importorskip("devinterp.analyses.transitions")
    from devinterp.cli import main

    s = analyze(store_copy, [WeightNorm()], transitions=True)
    assert (store_copy / "analysis" / "transitions.json").exists()
    assert isinstance(s.transitions, tuple)
    assert main(["report", str(store_copy), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "`norm/total`" in md and "`loss/train`" in md
    assert (tmp_path / "rep" / "summary.png").stat().st_size > 1000
    assert json.loads((tmp_path / "rep" / "summary.json").read_text())["transitions"] == [
        json.loads((store_copy / "analysis" / "transitions.json").read_text())[i]
        for i in range(len(s.transitions))]


def test_report_without_results_folder_content(tmp_path):
    from devinterp.posthoc.api import write_report

    (tmp_path / "x").mkdir()
    with pytest.raises(StoreNotFoundError, match="results.jsonl"):
        write_report(tmp_path / "x")


# ------------------------------------------------------------------------------------------
# a folder of Lightning .ckpt files


def test_analyze_checkpoint_folder(run_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_dir / "ckpt", ckpt)
    with pytest.raises(FactoryError, match="Lightning checkpoints do not record it.*--model"):
        _analyze(ckpt, [WeightNorm()])
    s = _analyze(ckpt, [WeightNorm()], model="_snapshot_models:TinyModule")
    assert s.computed == 3 and s.out_dir == str(ckpt / "devinterp-analysis")
    recs = {r.step: r for r in ResultsFile(ckpt / "devinterp-analysis" / "results.jsonl").read()}
    assert sorted(recs) == [8, 16, 24]
    # the same weights as the snapshot store's at the same steps
    model = TinyModule()
    SnapshotStore(run_dir / "store").load_into(model, 24)
    norm = sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()) ** 0.5
    assert recs[24].scalars["norm/total"] == pytest.approx(norm, rel=1e-12)


# ------------------------------------------------------------------------------------------
# bad input: each a clear message naming the thing and the fix


def test_empty_folder_and_empty_store(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreNotFoundError, match="SnapshotCallback wrote.*ModelCheckpoint"):
        _analyze(tmp_path / "empty", [WeightNorm()])
    SnapshotStore(tmp_path / "s", mode="a")  # a store without snapshots
    (tmp_path / "s" / "index.jsonl").write_text("")
    with pytest.raises(EmptyStoreError, match="no snapshot yet"):
        _analyze(tmp_path / "s", [WeightNorm()])


def test_factory_that_does_not_import(store_copy):
    with pytest.raises(FactoryError, match="no_such_pkg.*cannot be imported.*PYTHONPATH"):
        _analyze(store_copy, [WeightNorm()], model="no_such_pkg.models:make")
    with pytest.raises(FactoryError, match="has no attribute 'nope'"):
        _analyze(store_copy, [WeightNorm()], model="_posthoc_helpers:nope")
    with pytest.raises(FactoryError, match="not of the form package.module:name"):
        _analyze(store_copy, [WeightNorm()], model="just_a_name")


def test_model_that_does_not_match_the_weights(store_copy):
    with pytest.raises(StateDictMismatchError, match="shape mismatches.*pass --model"):
        _analyze(store_copy, [WeightNorm()], model="_posthoc_helpers:WrongModel")


class _NeedsData(WeightNorm):
    needs_data = True


@pytest.mark.parametrize(
    "data, match",
    [("_posthoc_helpers:return_none", "returned None"),
     ("_posthoc_helpers:empty_data", "empty Dataset"),
     (None, "defines no train_dataloader.*--data")],
)
def test_data_factory_that_returns_nothing(store_copy, data, match):
    with pytest.raises(FactoryError, match=match):
        _analyze(store_copy, [_NeedsData()], data=data)


def test_loss_that_does_not_fit_the_data(store_copy):
    with pytest.raises(FactoryError, match="failed on the first batch"):
        _analyze(store_copy, [_NeedsData()], data=(torch.zeros(8, 3),), loss="_posthoc_helpers:mse_loss")


def test_main_script_class_is_explained(store_copy):
    run = json.loads((store_copy / "run.json").read_text())
    run["model_class"] = "__main__:TinyModule"
    (store_copy / "run.json").write_text(json.dumps(run))
    with pytest.raises(FactoryError, match="defined in the training script"):
        _analyze(store_copy, [WeightNorm()])


def test_cli_prints_clear_errors(tmp_path, capsys):
    from devinterp.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty"), "--analysis", "_posthoc_helpers:WeightNorm"]) == 2
    err = capsys.readouterr().err
    assert "devinterp analyze: error:" in err and "holds neither" in err


# ------------------------------------------------------------------------------------------
# the real analyses


def test_llc_analysis_on_snapshots(store_copy):
    pytest.importorskip("devinterp.analyses.llc")
    from _posthoc_helpers import tiny_data

    from devinterp.posthoc import LLCAnalysis

    llc = LLCAnalysis(num_chains=2, num_draws=30, num_burnin=10, step_size=1e-3)
    s = _analyze(store_copy, [llc], data="_posthoc_helpers:tiny_data", steps="last:2")
    assert s.computed == 2
    recs = ResultsFile(store_copy / "analysis" / "results.jsonl").read()
    assert all(np.isfinite(r.scalars["llc/mean"]) for r in recs)
    # the same snapshot, estimated directly with the derived seed, gives the same number
    from devinterp.analyses import estimate_llc
    from devinterp.factories import module_loss

    model = TinyModule()
    SnapshotStore(store_copy).load_into(model, 24)
    model.eval()
    direct = estimate_llc(model, tiny_data(), module_loss, num_chains=2, num_draws=30, num_burnin=10,
                          step_size=1e-3, seed=derive_seed(0, 24, "llc"), vectorize=False)
    assert next(r for r in recs if r.step == 24).scalars["llc/mean"] == pytest.approx(direct.mean, rel=1e-9)


def test_circuit_analysis_on_a_transformer_store(tmp_path):
    pytest.importorskip("devinterp.analyses.circuits")
    from devinterp.analyses import icl_score, induction_scores
    from devinterp.models import AttentionOnlyTransformer
    from devinterp.posthoc import CircuitAnalysis

    hp = {"vocab_size": 16, "n_layers": 2, "n_heads": 2, "d_model": 16, "n_ctx": 24}
    store = SnapshotStore(tmp_path / "s", mode="a")
    store.write_run(model_class=AttentionOnlyTransformer, hparams=hp)
    for step in (0, 10, 20):
        store.save(step, AttentionOnlyTransformer(**hp, seed=step).state_dict())
    s = _analyze(tmp_path / "s", [CircuitAnalysis(num_sequences=4)])  # vocab and length from run.json
    assert s.computed == 3
    rec = next(r for r in ResultsFile(tmp_path / "s" / "analysis" / "results.jsonl").read() if r.step == 10)
    model = AttentionOnlyTransformer(**hp, seed=10)
    direct = induction_scores(model, vocab_size=16, seq_len=24, num_sequences=4, seed=0, copying=False).scalars()
    assert set(direct) <= set(rec.scalars)
    assert all(rec.scalars[k] == pytest.approx(v, abs=1e-6) for k, v in direct.items())
    icl = icl_score(model, None, vocab_size=16, seq_len=24, num_sequences=4, seed=0)
    assert rec.scalars["icl_score"] == pytest.approx(icl, abs=1e-6)
    with pytest.raises(Exception, match="--vocab-size"):
        store.write_run(model_class=AttentionOnlyTransformer, hparams={})
        _analyze(tmp_path / "s", [CircuitAnalysis(num_sequences=4)], force=True,
                 model=lambda: AttentionOnlyTransformer(**hp))


def test_llc_auto_step_size_calibrates_once_and_reuses(store_copy):
    from devinterp.posthoc import LLCAnalysis

    llc = LLCAnalysis(num_chains=2, num_draws=30, num_burnin=10)  # step_size="auto"
    s1 = _analyze(store_copy, [llc], data="_posthoc_helpers:tiny_data", steps="last:2")
    assert s1.computed == 2
    cal_files = list((store_copy / "analysis").glob("calibration-*.json"))
    assert len(cal_files) == 1
    mtime = cal_files[0].stat().st_mtime_ns
    first = {r.step: r.scalars["llc/mean"] for r in ResultsFile(store_copy / "analysis" / "results.jsonl").read()}
    s2 = _analyze(store_copy, [llc], data="_posthoc_helpers:tiny_data", steps="last:2", force=True)
    assert s2.computed == 2 and cal_files[0].stat().st_mtime_ns == mtime  # reused, not recomputed
    second = {r.step: r.scalars["llc/mean"]
              for r in ResultsFile(store_copy / "analysis" / "results.jsonl").read()[2:]}
    assert second == first


def _induction_store(root: Path, llc: dict | None) -> Path:
    """A small demo-like store: InductionLM (tiny recipe) trained a few steps, three snapshots."""
    from devinterp.demo import InductionLM, token_loss
    from devinterp.models import induction_recipe

    recipe = induction_recipe(vocab_size=16, n_ctx=16, d_model=16, n_heads=2, n_layers=2, batch_size=16,
                              span_min=4, span_max=8)
    module = InductionLM(recipe, seed=0, llc_samples=64, llc=llc)
    store = SnapshotStore(root, mode="a")
    store.write_run(model_class=InductionLM, hparams=dict(module.hparams))
    data = recipe.build_data(0)
    opt = recipe.build_optimizer(module.model)
    gen = torch.Generator().manual_seed(1)
    for step in range(31):
        if step in (0, 15, 30):
            store.save(step, module.state_dict())
        loss = token_loss(module.model, data.sample(16, generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return root


def test_analyze_llc_takes_the_modules_settings_and_flags_win(tmp_path, capsys):
    """`devinterp analyze --llc` on a demo-like store uses InductionLM.devinterp_llc_settings()."""
    from devinterp.cli import main

    settings = dict(num_chains=2, num_draws=20, num_burnin=20, localization=50.0, batch_size=8,
                    num_acceptance_checks=5, calibrate_kwargs=dict(num_steps=60, max_burnin=20, max_draws=20, min_burnin=10,
                                          min_draws=10, target_ess=20, min_acceptance=0.7, grid_top=2.0,
                                          budget=2000))
    root = _induction_store(tmp_path / "s", settings)
    assert json.loads((root / "run.json").read_text())["hparams"]["llc"]["batch_size"] == 8
    out = tmp_path / "a"
    rc = main(["analyze", str(root), "--llc", "--circuits", "--transitions", "--steps", "last:2",
               "--num-sequences", "4", "--no-tensorboard", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "LLC settings from InductionLM.devinterp_llc_settings()" in err
    recs = [r for r in ResultsFile(out / "results.jsonl").read() if r.analysis == "llc"]
    assert {r.step for r in recs} == {15, 30}
    for r in recs:
        assert math.isfinite(r.scalars["llc/mean"]) and math.isfinite(r.scalars["llc/stderr"])
        params = r.meta["params"]
        assert (params["batch_size"], params["num_chains"], params["localization"]) == (8, 2, 50.0)
        assert params["num_acceptance_checks"] == 5
        assert params["calibrate_kwargs"]["num_steps"] == 60
    cal = json.loads(next(out.glob("calibration-*.json")).read_text())
    assert cal["batch_size"] == 8 and cal["localization"] == 50.0 and cal["budget"] == 2000
    assert cal["cost"] <= 0.6 * 2000
    # an explicit flag wins over the module's setting; the rest still comes from the module
    rc = main(["analyze", str(root), "--llc", "--steps", "last:1", "--llc-chains", "1", "--llc-budget", "1200",
               "--no-tensorboard", "--no-progress", "--out", str(tmp_path / "b")])
    assert rc == 0
    (rec,) = [r for r in ResultsFile(tmp_path / "b" / "results.jsonl").read() if r.analysis == "llc"]
    assert rec.meta["params"]["num_chains"] == 1 and rec.meta["params"]["batch_size"] == 8
    assert rec.meta["params"]["calibrate_kwargs"]["budget"] == 1200
    assert json.loads(next((tmp_path / "b").glob("calibration-*.json")).read_text())["budget"] == 1200


def test_module_llc_settings_are_checked_and_can_be_ignored():
    from devinterp.demo import InductionLM, demo_config, demo_llc_settings
    from devinterp.errors import FactoryError
    from devinterp.posthoc import LLCAnalysis

    quick = demo_llc_settings(demo_config(quick=True))
    assert quick["batch_size"] == demo_config(quick=True).llc_batch_size
    module = InductionLM(llc=quick)
    filled = LLCAnalysis(num_draws=7).with_module_settings(module)
    assert filled.num_draws == 7 and filled.num_chains == quick["num_chains"]
    assert filled.calibrate_kwargs["num_steps"] == quick["calibrate_kwargs"]["num_steps"]
    assert filled.num_acceptance_checks == demo_config(quick=True).llc_acceptance_checks
    assert LLCAnalysis(module_settings=False).with_module_settings(module).batch_size is None
    assert InductionLM().devinterp_llc_settings() == demo_llc_settings()  # a run that recorded none
    # the results key of an analysis without the new options is what it was before them
    assert not {"module_settings", "calibrate_kwargs", "num_acceptance_checks"} & set(LLCAnalysis().config())

    class Bad(torch.nn.Module):
        def devinterp_llc_settings(self):
            return {"num_chainz": 2}

    with pytest.raises(FactoryError, match="num_chainz"):
        LLCAnalysis().with_module_settings(Bad())
    with pytest.raises(Exception, match="unknown calibrate"):
        LLCAnalysis(calibrate_kwargs={"grid_tpo": 1.0})
