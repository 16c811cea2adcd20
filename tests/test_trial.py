"""advisor.trial: advice that beats the naive default on real tables, studies that resume and never reuse stale
results, several workers (SQLite and a real PostgreSQL server) ending with one answer, takeover of a dead
worker's runs, diverged runs recorded as failures, and bad input."""

import glob
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings

import optuna
import pytest
import torch

from optadvisor.advisor import advise, profile_data, trial
from optadvisor.advisor._examples import example_task
from optadvisor.advisor._train import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(__file__))
sys.path.append(ROOT)  # the benchmarks package is run from the repository root, not installed; appended: first,
# the root would make our kernels/ folder shadow Hugging Face's top-level `kernels` (transformers imports it)
from trial_worker import SMALL, small_study, summary  # noqa: E402
WORKER = os.path.join(os.path.dirname(__file__), "trial_worker.py")


def _study_runs(storage_url):
    """{study name: [trials]} of the trial studies (not the claim records) in a storage."""
    out = {}
    for s in optuna.get_all_study_summaries(storage_url):
        if "/claim/" not in s.study_name:
            out[s.study_name] = optuna.load_study(study_name=s.study_name, storage=storage_url).trials
    return out


def _workers(storage, n, *extra, timeout=600):
    """Start n worker processes together on one storage; their parsed results."""
    folder = tempfile.mkdtemp()
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, WORKER, storage, "--barrier", folder, str(n), *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    shutil.rmtree(folder)
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The small study run by one worker alone (in a process of its own, as the others)."""
    db = tmp_path_factory.mktemp("ref") / "ref.db"
    return _workers(f"sqlite:///{db}", 1)[0]


def _assert_each_run_once(trials, n_slots_at_most):
    by_slot = {}
    for t in trials:
        by_slot.setdefault(t.user_attrs["run"]["slot"], []).append(t)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    for slot, ts in by_slot.items():
        assert ts[-1].state in finished
        done = [t for t in ts if t.state != optuna.trial.TrialState.FAIL or "diverged" in t.user_attrs.get("outcome", {})]
        assert len(done) == 1, f"slot {slot} ran {len(done)} times"
    assert len(by_slot) <= n_slots_at_most
    return by_slot


# ---------------------------------------------------------------------------------------------------------
# the advice on real data, judged by the advice benchmark's protocol against its cached reference grid

def test_advice_benchmark_quick_meets_the_targets(tmp_path):
    """``python -m benchmarks advice --quick`` (iris, diabetes with planted outliers) against the cached grid."""
    from benchmarks.advice import main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "advice.json").read_text())["rows"]
    assert [r["data"] for r in rows] == ["iris", "diabetes_outliers"]
    assert "| diabetes_outliers | fit | val_mse |" in (tmp_path / "advice.md").read_text()
    for row in rows:
        best, naive = row["grid_best"], row["naive"]
        trial_value, rules_value = row["trial"]["value"], row["rules"]["value"]
        # the targets: the trial near the grid's best, the rules-only advice never behind the naive
        # default (no longer "within 10% of the best": that was met on diabetes by a rule fitted to diabetes,
        # small-regression-lower-lr, dropped when the fitting half showed it worse on 3 of 7 tables)
        if row["task"] == "regression":
            assert trial_value <= 1.03 * best
            assert rules_value <= 1.02 * naive
        else:
            assert trial_value <= best + 0.005
            assert rules_value <= naive + 0.005
        assert row["trial"]["steps_run"] <= row["grid_steps"] / 5
        assert row["half"] == "fit" and row["trial"]["finalists"][0] == row["trial"]["origin"]
    # on outlier-laden targets the advice is Huber, where the naive default (MSE) is 4x worse; the naive default
    # is a finalist there (on iris it is the rules' advice itself, so it is not run twice)
    assert rows[1]["rules"]["loss"]["name"] == "HuberLoss" and rows[1]["naive"] > 3 * rows[1]["grid_best"]
    assert "naive" in rows[1]["trial"]["finalists"] and "naive" not in rows[0]["trial"]["finalists"]
    assert "many-to-one" in rows[1]["trial"]["verdict"]


def adv_text(res):
    return res.recommendation.explain()


def test_the_rules_advice_is_always_a_finalist_so_the_winner_is_never_worse(tmp_path):
    model_fn, train, val, rec = small_study()
    res = trial(model_fn, train, val, rec, storage=str(tmp_path / "s.db"), progress=False, **SMALL)
    rules = [c for c in res.ranked if c.origin == "rules"]
    assert len(rules) == 1
    assert rules[0].optimizer.name == rec.optimizer.name and rules[0].lr == rec.optimizer.params["lr"]
    assert res.winner is res.ranked[0] and res.winner.mean <= rules[0].mean
    # judged on the seeds that did not select them (SMALL: search on 0, finalists on 1 and 2), by the many-to-one test
    assert all(c.seeds == [1, 2] and len(c.values) == 2 for c in res.ranked)
    assert "many-to-one" in res.verdict and res.verdict in adv_text(res)
    assert res.configs_tried == SMALL["n_trials"] and 0 < res.pruned < res.configs_tried
    assert res.steps_total == res.steps_run  # one worker: everything ran here
    adv = res.recommendation
    assert adv.train_steps == res.winner.best_step and 0 < adv.train_steps <= SMALL["budget_steps"]
    assert adv.optimizer.params["lr"] == res.winner.lr
    assert adv.reasons[0].rule_id == "trial" and "Optuna study" in adv.reasons[0].source
    assert "train for" in adv.explain() and "stop early" in adv.notes[0].text
    # the curves are the metric (val_error on iris); the winner's values are its seeds' values at its best step
    for c in res.ranked:
        assert [dict(curve)[c.best_step] for curve in c.curves] == c.values
        assert all(0 <= v <= 1 for curve in c.curves for _, v in curve)
    # the learning rates searched reach two decades and more below the range test's centre
    plan = optuna.load_study(study_name=res.study_name, storage=res.storage).user_attrs["plan"]
    centres = optuna.load_study(study_name=res.study_name, storage=res.storage).user_attrs["centres"]
    offsets = [math.log10(p["lr"] / centres[p["optimizer"]]["lr"]) for p in plan[1:]]
    assert min(offsets) < -2.0 and max(offsets) > 0
    assert res.recommendation.model_validate_json(res.recommendation.model_dump_json()).train_steps == adv.train_steps


# ---------------------------------------------------------------------------------------------------------
# studies: fingerprints, resuming, several workers, dead workers

def test_changed_data_starts_fresh_and_an_identical_call_resumes(tmp_path):
    model_fn, train, val, rec = small_study()
    db = str(tmp_path / "same.db")
    first = trial(model_fn, train, val, rec, storage=db, progress=False, **SMALL)
    again = trial(model_fn, train, val, rec, storage=db, progress=False, **SMALL)
    assert again.steps_run == 0 and summary(again)["ranked"] == summary(first)["ranked"]
    # another validation set (the defect: the old keys repeated, so the first call's numbers came back)
    val2 = (val[0], torch.roll(val[1], 1))
    other = trial(model_fn, train, val2, rec, storage=db, progress=False, **SMALL)
    assert other.study_name != first.study_name and other.steps_run > 0
    assert other.winner.mean != first.winner.mean
    # another model (same data), another hyperparameter: fresh studies too
    wider = trial(lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)), train,
                  val, rec, storage=db, progress=False, **SMALL)
    assert wider.study_name not in (first.study_name, other.study_name)
    tweaked = rec.model_copy(deep=True)
    tweaked.optimizers["Adam"].params["eps"] = 1e-6
    assert trial(model_fn, train, val, tweaked, storage=db, progress=False, **SMALL).study_name not in (
        first.study_name, other.study_name, wider.study_name)
    # a study name given by hand that holds another fingerprint is refused, not reused
    with pytest.raises(ValueError, match="fingerprint differs"):
        trial(model_fn, train, val2, rec, storage=db, study_name=first.study_name, progress=False, **SMALL)


def test_resume_after_a_kill_redoes_nothing_and_ends_as_one_uninterrupted_run(tmp_path, reference):
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    env = {**os.environ, "PYTHONPATH": ROOT}
    # model_fn calls: 1 loss probe (which candidate losses take the model's output), 1 fingerprint, 4 range
    # tests, then one per run: die inside the 10th run
    proc = subprocess.run([sys.executable, WORKER, url, "--die-at", "16"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 9, proc.stderr[-3000:]
    (trials,) = _study_runs(url).values()
    finished = [t for t in trials if t.state != optuna.trial.TrialState.RUNNING]
    assert len(finished) == 9 and len(trials) == 10  # the 10th was running when the process died
    resumed = _workers(url, 1)[0]
    assert resumed["ranked"] == reference["ranked"]
    assert resumed["steps_total"] == reference["steps_total"]
    trained_before = sum(t.user_attrs["outcome"]["steps"] for t in finished)
    centres = optuna.load_study(study_name=resumed["study"], storage=url).user_attrs["centres"]
    range_tests = sum(c["steps"] for c in centres.values())  # run once, by the killed worker; stored in the study
    assert resumed["steps_run"] == reference["steps_total"] - trained_before - range_tests
    (trials,) = _study_runs(url).values()
    by_slot = _assert_each_run_once(trials, 10**6)
    assert max(len(ts) for ts in by_slot.values()) == 2  # the killed run was redone once, as attempt 1


def test_two_workers_on_sqlite_finish_every_run_once_with_one_workers_answer(tmp_path, reference):
    url = f"sqlite:///{tmp_path / 'two.db'}"
    a, b = _workers(url, 2)
    assert a["ranked"] == b["ranked"] == reference["ranked"]
    assert a["train_steps"] == b["train_steps"] == reference["train_steps"]
    assert a["steps_run"] > 0 and b["steps_run"] > 0  # both worked
    assert a["steps_run"] + b["steps_run"] == reference["steps_run"]  # ...and nothing was done twice
    (trials,) = _study_runs(url).values()
    _assert_each_run_once(trials, 10**6)
    assert len({t.user_attrs["run"]["worker"] for t in trials}) == 2


def test_a_dead_workers_run_is_taken_over_after_its_heartbeat_stops(tmp_path, reference):
    url = f"sqlite:///{tmp_path / 'dead.db'}"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, WORKER, url, "--die-at", "12"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 9
    # a worker that cannot see the dead process (as on another host) waits for the heartbeat's grace period
    out = subprocess.run([sys.executable, WORKER, url, "--remote", "--grace", "3"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["ranked"] == reference["ranked"]
    (trials,) = _study_runs(url).values()
    by_slot = _assert_each_run_once(trials, 10**6)
    retried = [ts for ts in by_slot.values() if len(ts) == 2]
    assert len(retried) == 1 and retried[0][0].state == optuna.trial.TrialState.FAIL


def _postgres_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else (os.path.dirname(shutil.which("initdb") or "") or None)


@pytest.fixture(scope="module")
def postgres_url():
    """A real PostgreSQL server on localhost, in a temporary directory, for this module's tests."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL's server programs (initdb, pg_ctl) are not installed: apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver: pip install '.[test]' installs psycopg2-binary")
    home = tempfile.mkdtemp(prefix="optadvisor-pg-")
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(home, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(*cmd):
        subprocess.run(as_user + [os.path.join(bindir, cmd[0]), *cmd[1:]], check=True, capture_output=True,
                       timeout=120)
    data = os.path.join(home, "data")
    run("initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
    run("pg_ctl", "-D", data, "-l", os.path.join(home, "log"), "-w", "-o",
        f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start")
    try:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "optuna")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/optuna"
    finally:
        run("pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(home, ignore_errors=True)


def test_two_workers_on_a_postgresql_server(postgres_url, reference):
    a, b = _workers(postgres_url, 2)
    assert a["ranked"] == b["ranked"] == reference["ranked"]
    assert a["steps_run"] + b["steps_run"] == reference["steps_run"]
    assert a["steps_run"] > 0 and b["steps_run"] > 0
    (trials,) = _study_runs(postgres_url).values()
    _assert_each_run_once(trials, 10**6)
    assert len({t.user_attrs["run"]["worker"] for t in trials}) == 2
    # a third worker afterwards redoes nothing and gives the same answer
    (c,) = _workers(postgres_url, 1)
    assert c["steps_run"] == 0 and c["ranked"] == reference["ranked"]


# ---------------------------------------------------------------------------------------------------------
# failures and bad input

def test_a_diverged_run_is_recorded_as_failed_and_the_search_goes_on(tmp_path):
    model_fn, train, val, rec = small_study()
    wild = rec.model_copy(update={"optimizer": rec.optimizers["SGD"].model_copy(
        update={"params": {**rec.optimizers["SGD"].params, "lr": 1e6}})}, deep=True)
    res = trial(model_fn, train, val, wild, storage=str(tmp_path / "nan.db"), progress=False, **SMALL)
    assert any(f.startswith("run 0 (SGD lr 1e+06") and "became" in f for f in res.failed), res.failed
    assert all(c.origin != "rules" for c in res.ranked) and math.isfinite(res.winner.mean)
    (trials,) = _study_runs(res.storage).values()
    slot0 = [t for t in trials if t.user_attrs["run"]["slot"] == 0]
    assert len(slot0) == 1 and slot0[0].state == optuna.trial.TrialState.FAIL
    # resuming does not retry it: a diverged run is a result
    assert trial(model_fn, train, val, wild, storage=str(tmp_path / "nan.db"), progress=False,
                 **SMALL).steps_run == 0


def test_bad_input(tmp_path):
    model_fn, train, val, rec = small_study()
    db = str(tmp_path / "bad.db")
    with pytest.raises(ValueError, match="cannot open the Optuna storage"):
        trial(model_fn, train, val, rec, storage="postgresql+psycopg2://nobody@127.0.0.1:1/none", progress=False)
    with pytest.raises(ValueError, match="metric must be one of"):
        trial(model_fn, train, val, rec, metric="accuracy", storage=db, progress=False)
    with pytest.raises(ValueError, match="needs a regression task"):
        trial(model_fn, train, val, rec, metric="val_mse", storage=db, progress=False)
    with pytest.raises(ValueError, match="need equal, > 0|is empty"):
        trial(model_fn, (train[0][:0], train[1][:0]), val, rec, storage=db, progress=False)
    with pytest.raises(ValueError, match="val_data has one class"):
        trial(model_fn, train, (val[0], torch.zeros_like(val[1])), rec, storage=db, progress=False)
    with pytest.raises(ValueError, match="seeds must be distinct"):
        trial(model_fn, train, val, rec, seeds=(0, 0), storage=db, progress=False)
    with pytest.raises(ValueError, match="n_trials must be an integer"):
        trial(model_fn, train, val, rec, n_trials=0, storage=db, progress=False)
    rmodel, rtrain, rval = example_task("diabetes")
    rrec = advise(profile_data(*rtrain, model=rmodel()))
    with pytest.raises(ValueError, match="train_data has a constant target"):
        trial(rmodel, (rtrain[0], torch.ones_like(rtrain[1])), rval, rrec, storage=db, progress=False)
    # nothing was written by the refused calls
    assert _study_runs(f"sqlite:///{db}") == {}
    # a budget too small to prune: said, and what fits is run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = trial(model_fn, train, val, rec, budget_steps=20, n_trials=12, seeds=(0,), top_k=1, lr_steps=20,
                    storage=db, progress=False)
    assert any("too small to prune" in str(w.message) for w in caught)
    assert res.configs_tried == 4 and res.pruned == 0 and res.skipped


def test_metrics():
    model = torch.nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [0, 0]]))
        model.bias.zero_()
    X = torch.tensor([[1.0, 0], [1.0, 0], [1.0, 0], [0, 1.0], [1.0, 0]])
    y = torch.tensor([0, 0, 0, 1, 1])   # predictions 0 0 0 1 0: one error in class 1
    assert evaluate(model, (X, y), "val_error") == pytest.approx(1 / 5)
    assert evaluate(model, (X, y), "val_balanced_error") == pytest.approx((0 / 3 + 1 / 2) / 2)
    reg = torch.nn.Linear(1, 1)
    with torch.no_grad():
        reg.weight.fill_(1.0)
        reg.bias.zero_()
    Xr, yr = torch.tensor([[1.0], [2.0]]), torch.tensor([[2.0], [2.0]])
    assert evaluate(reg, (Xr, yr), "val_mse") == pytest.approx(0.5)
    assert evaluate(reg, (Xr, yr), "val_mae") == pytest.approx(0.5)
    # batches count by rows
    assert evaluate(reg, [(Xr[:1], yr[:1]), (Xr[1:], yr[1:])], "val_mse") == pytest.approx(0.5)


def test_plots_and_table(tmp_path):
    model_fn, train, val, rec = small_study()
    res = trial(model_fn, train, val, rec, storage=str(tmp_path / "p.db"), progress=False, **SMALL)
    assert os.path.getsize(res.plot(str(tmp_path / "curves.png"))) > 1000
    assert "| 1 |" in res.table() and "rules" in res.table()


def test_candidate_optimizers_are_the_catalogs_defaults_plus_what_a_rule_scored(tmp_path):
    """The trial's optimizers come from kernels' catalog: those searched by default, and Adagrad (not a
    default candidate) only when a rule scored it — then it is the rules' run and gets a range test."""
    model_fn, train, val, rec = small_study()
    small = dict(budget_steps=60, n_trials=6, seeds=(0,), top_k=1, lr_steps=20, progress=False)
    res = trial(model_fn, train, val, rec, storage=str(tmp_path / "dense.db"), **small)
    centres = optuna.load_study(study_name=res.study_name, storage=res.storage).user_attrs["centres"]
    assert list(centres) == ["Adam", "AdamW", "SGD", "RMSprop"]
    sparse = advise({**rec.facts.model_dump(exclude_none=True), "feature_sparsity": 0.97})
    assert sparse.optimizer.name == "Adagrad"
    res = trial(model_fn, train, val, sparse, storage=str(tmp_path / "sparse.db"), **small)
    study = optuna.load_study(study_name=res.study_name, storage=res.storage)
    assert list(study.user_attrs["centres"]) == ["Adam", "AdamW", "SGD", "RMSprop", "Adagrad"]
    assert study.user_attrs["plan"][0]["optimizer"] == "Adagrad"


def test_cross_validated_finalists(tmp_path):
    """cv_folds=3: the finalists' fresh runs hold out one fold each of the pooled train + validation rows (their
    curves are measured on folds, not on the caller's validation split), the seeds default to range(4)."""
    model_fn, train, val, rec = small_study()
    small = {k: v for k, v in SMALL.items() if k != "seeds"}
    res = trial(model_fn, train, val, rec, storage=str(tmp_path / "cv.db"), progress=False, cv_folds=3, **small)
    assert all(c.seeds == [1, 2, 3] for c in res.ranked)
    assert "3-fold cross-validation" in res.recommendation.explain()
    # iris: 150 rows, folds of 50; the caller's validation split has 38 rows: error rates in 1/50 steps
    values = [v for c in res.ranked for curve in c.curves for _, v in curve]
    assert all(abs(v * 50 - round(v * 50)) < 1e-9 for v in values) and any(v > 0 for v in values)
    # a different study from the plain one (the fingerprint has cv_folds)
    plain = trial(model_fn, train, val, rec, storage=str(tmp_path / "cv.db"), progress=False, **SMALL)
    assert plain.study_name != res.study_name
    with pytest.raises(ValueError, match="cv_folds must be an integer >= 2"):
        trial(model_fn, train, val, rec, storage=str(tmp_path / "cv.db"), progress=False, cv_folds=1)
    with pytest.raises(ValueError, match=r"cv_folds=3 needs 4 seeds, the search's and one per fold \(got 3\)"):
        trial(model_fn, train, val, rec, storage=str(tmp_path / "cv.db"), progress=False, cv_folds=3, seeds=(0, 1, 2))
    with pytest.raises(ValueError, match=r"cv_folds needs train_data and val_data as \(X, y\) pairs"):
        trial(model_fn, [train], val, rec, storage=str(tmp_path / "cv.db"), progress=False, cv_folds=3)
