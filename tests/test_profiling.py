"""profile_data, diagnose/TrainingMonitor and lr_range_test on synthetic data with known properties."""

import json
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import examples

from optadvisor import kernels
from optadvisor.advisor import TrainingMonitor, advise, diagnose, lr_range_test, profile_data

SETTINGS = settings(max_examples=examples(15), deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- profile_data ----------------------------------------------------------------------------------------
@SETTINGS
@given(n=st.integers(200, 3000), frac=st.sampled_from([0.0, 0.03, 0.1, 0.2]), dtype=st.sampled_from(
    [torch.float32, torch.float64]), as_numpy=st.booleans(), seed=st.integers(0, 100))
def test_planted_outliers_are_found(n, frac, dtype, as_numpy, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=dtype)
    y = torch.randn(n, generator=g, dtype=dtype) * 2 + 5
    k = int(frac * n)
    y[:k] = 5 + 200 * torch.sign(torch.randn(k, generator=g, dtype=dtype))  # far outside 3 IQR
    data = (X.numpy(), y.numpy()) if as_numpy else (X, y)
    prof = profile_data(*data)
    assert prof.facts.task == "regression"
    assert prof.facts.target_outlier_fraction == pytest.approx(k / n, abs=0.01)
    # 1.4826 x MAD estimates sigma = 2; planted outliers (up to 20%) bias it upward, by ~30% at 20%
    assert 2.0 * 0.75 < prof.facts.target_scale < 2.0 * (1.0 + 2.0 * frac + 0.25)
    assert prof.facts.n_samples == n and prof.facts.n_features == 4
    if frac >= 0.1:
        assert advise(prof).loss.name == "HuberLoss"


@pytest.mark.parametrize("distance", [2.0, 2.9, 3.1, 5.0, 10.0])
def test_the_outlier_fence_is_3_iqr(distance):
    """Targets exactly `distance` IQRs beyond the quartiles: outliers iff distance > 3 (Tukey's far-out fence).
    Planted outliers 100 IQR away cannot tell a fence of 3 from one of 30; these can."""
    base = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)  # quartiles 0.25, 0.75: IQR 0.5
    k = 50
    y = torch.cat([base, torch.full((k,), 0.75 + distance * 0.5, dtype=torch.float64)])
    prof = profile_data(torch.randn(len(y), 2), y, task="regression")
    q1, q3 = (torch.quantile(y, q).item() for q in (0.25, 0.75))
    lo, hi = q1 - 3 * (q3 - q1), q3 + 3 * (q3 - q1)
    assert f"[{lo:.4g}, {hi:.4g}]" in prof.evidence["target_outlier_fraction"]
    expected = k / len(y) if 0.75 + distance * 0.5 > hi else 0.0
    assert prof.facts.target_outlier_fraction == pytest.approx(expected)


@SETTINGS
@given(n_classes=st.integers(2, 12), ratio=st.sampled_from([1, 5, 20]), per=st.integers(20, 60),
       int_dtype=st.sampled_from([torch.int64, torch.int32, torch.float32]))
def test_planted_classes_and_imbalance(n_classes, ratio, per, int_dtype):
    counts = [per * ratio] + [per] * (n_classes - 1)
    y = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)]).to(int_dtype)
    X = torch.randn(len(y), 3)
    prof = profile_data(X, y)
    assert prof.facts.task == "classification"
    assert prof.facts.class_counts == counts
    assert prof.facts.class_imbalance == pytest.approx(ratio)
    assert ("binary" in prof.evidence["task"]) == (n_classes == 2)


def test_dataloader_streaming_and_model_facts():
    X, y = torch.randn(5000, 6), torch.randint(0, 4, (5000,))
    ds = torch.utils.data.TensorDataset(X, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=333)
    prof = profile_data(loader, model=torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3), torch.nn.Flatten()))
    assert prof.facts.n_samples == 5000 and prof.facts.n_classes == 4 and prof.facts.model_kind == "cnn"
    assert profile_data(ds).facts.class_counts == profile_data(X, y).facts.class_counts
    assert profile_data(X, y, model=torch.nn.Linear(6, 4)).facts.model_kind == "linear"
    tf = torch.nn.TransformerEncoderLayer(8, 2, 16)
    assert profile_data(X, y, model=tf).facts.model_kind == "transformer"
    assert profile_data(X, y, model=torch.nn.LSTM(6, 4)).facts.model_kind == "rnn"


def test_nan_is_reported_not_dropped():
    X, y = torch.randn(100, 3), torch.randn(100)
    X[0, 0] = float("nan")
    y[:5] = float("nan")
    prof = profile_data(X, y)
    assert prof.nan_in_features == 1 and prof.nan_in_target == 5
    assert "NaN" in prof.evidence["missing"] and prof.facts.n_samples == 100


@pytest.mark.parametrize("labels", [(1, 2), (3, 7, 11), (-1, 1), (0, 2, 5)])
def test_labels_other_than_0_to_k_keep_the_imbalance(labels):
    """Labels that are not 0..K-1 are mapped to class indices in sorted order, and the evidence says so;
    {1, 2} at 900/100 was once padded with an empty class 0: 3 classes, imbalance unknown, no weights."""
    counts = [900] + [100] * (len(labels) - 1)
    y = torch.cat([torch.full((c,), lab) for lab, c in zip(labels, counts)])
    prof = profile_data(torch.randn(len(y), 2), y)
    assert prof.facts.task == "classification" and prof.facts.n_classes == len(labels)
    assert prof.facts.class_counts == counts and prof.facts.class_imbalance == pytest.approx(9)
    assert prof.class_labels == list(labels)
    mapping = ", ".join(f"{lab}->{i}" for i, lab in enumerate(labels))
    assert mapping in prof.evidence["class_labels"]
    rec = advise(prof)
    assert rec.loss.name == "CrossEntropyLoss" and len(rec.loss.params["weight"]) == len(labels)
    assert rec.loss.params["weight"][0] < rec.loss.params["weight"][1]
    # the mapping the evidence names gives the indices the weights are for
    idx = torch.searchsorted(torch.tensor(prof.class_labels), y)
    assert torch.equal(torch.bincount(idx), torch.tensor(counts))
    same = profile_data(torch.randn(len(y), 2), idx)
    assert same.class_labels is None and "class_labels" not in same.evidence
    assert same.facts == prof.facts


def test_csv_empty_cells_are_missing_values(tmp_path, capsys):
    """One empty target cell once turned a regression column into string class labels (0% outliers,
    MSE): empty cells are missing values, counted and reported, and the rest is profiled."""
    from optadvisor.advisor.cli import main

    g = torch.Generator().manual_seed(0)
    y = torch.randn(500, generator=g) * 2.5
    y[:40] += 60.0
    X = torch.randn(500, 2, generator=g)
    rows = [f"{a},{b},{t}" for (a, b), t in zip(X.tolist(), y.tolist())]
    rows[7] = rows[7].rsplit(",", 1)[0] + ","  # one empty target cell
    rows[9] = "," + rows[9].split(",", 1)[1]  # one empty feature cell
    rows[11] = rows[11].rsplit(",", 1)[0] + ",NA"
    path = tmp_path / "d.csv"
    path.write_text("a,b,y\n" + "\n".join(rows) + "\n")
    assert main(["profile", str(path), "--target", "y", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    facts = out["profile"]["facts"]
    assert facts["task"] == "regression"
    assert 0.07 < facts["target_outlier_fraction"] < 0.09 and 1.5 < facts["target_scale"] < 4
    assert out["profile"]["nan_in_target"] == 2 and out["profile"]["nan_in_features"] == 1
    assert "2 missing targets" in out["profile"]["evidence"]["missing"]
    assert out["recommendation"]["loss"]["name"] == "HuberLoss"
    # class names with a missing cell: the missing one is not a class
    labels = tmp_path / "c.csv"
    labels.write_text("x,kind\n" + "\n".join(f"{i},{'' if i == 5 else 'cat' if i % 3 else 'dog'}"
                                              for i in range(60)))
    assert main(["profile", str(labels), "--target", "kind", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["profile"]["facts"]["class_counts"] == [39, 20] and out["profile"]["nan_in_target"] == 1


@pytest.mark.parametrize("args,exc,pattern", [
    ((torch.zeros(0, 3), torch.zeros(0)), ValueError, "empty"),
    ((torch.zeros(5, 3), torch.zeros(4)), ValueError, "5 rows but y has 4"),
    ((np.zeros((3, 2)), np.array(["a", "b", "c"])), TypeError, "numeric"),
    ((torch.tensor([[1.0], [float("inf")]]), torch.zeros(2)), ValueError, "infinite"),
    ((torch.zeros(2, 1), torch.tensor([1.0, float("inf")])), ValueError, "infinite"),
])
def test_bad_data(args, exc, pattern):
    with pytest.raises(exc, match=pattern):
        profile_data(*args)


def test_model_without_parameters_and_bad_task():
    with pytest.raises(ValueError, match="no trainable parameters"):
        profile_data(torch.randn(10, 2), torch.randn(10), model=torch.nn.ReLU())
    with pytest.raises(ValueError, match="task must be"):
        profile_data(torch.randn(10, 2), torch.randn(10), task="ranking")
    with pytest.raises(ValueError, match="integer class labels"):
        profile_data(torch.randn(10, 2), torch.randn(10), task="classification")


# ---- diagnose ----------------------------------------------------------------------------------------------
def _curve(n=200, fn=lambda s: 1 / (1 + 0.05 * s), noise=0.0, seed=0, **extra):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for s in range(n):
        row = {"step": s, "train_loss": fn(s) * (1 + noise * float(torch.randn((), generator=g))),
               "grad_norm": 1.0 + 0.1 * float(torch.rand((), generator=g)), "lr": 0.01}
        for k, f in extra.items():
            v = f(s)
            if v is not None:
                row[k] = v
        rows.append(row)
    return rows


CONDITIONS = {
    "diverged": _curve(fn=lambda s: 1 / (1 + 0.05 * s) if s < 150 else float("nan")),
    "plateau": _curve(fn=lambda s: max(0.5, 1 - 0.01 * s)),
    "noisy_loss": _curve(noise=0.6),
    "overfitting": _curve(val_loss=lambda s: (0.5 + abs(s - 80) / 200) if s % 10 == 0 else None),
    "loss_rising": _curve(fn=lambda s: 1 / (1 + 0.05 * s) if s < 100 else 1 / 6 * (1 + 0.02 * (s - 100))),
    "lr_too_low": _curve(fn=lambda s: 1 - 0.0005 * s),
}


@pytest.mark.parametrize("fact", list(CONDITIONS))
def test_each_condition_is_found_with_evidence(fact):
    d = diagnose(CONDITIONS[fact])
    assert d.facts[fact] is True, d.explain()
    finding = next(f for f in d.findings if f.fact == fact)
    assert finding.steps and finding.message


def test_exploding_gradients_and_clean_curve():
    rows = _curve()
    rows[120]["grad_norm"] = 80.0
    d = diagnose(rows)
    assert d.facts["exploding_gradients"] and d.facts["grad_norm_p90"] == pytest.approx(1.09, abs=0.02)
    clean = diagnose(_curve(val_loss=lambda s: 1 / (1 + 0.05 * s) + 0.05 if s % 10 == 0 else None))
    assert clean.findings == [], clean.explain()
    assert clean.facts["last_lr"] == 0.01


def test_monitor_roundtrip_and_advice(tmp_path):
    m = TrainingMonitor()
    for row in CONDITIONS["diverged"]:
        m.log(row["step"], **{k: v for k, v in row.items() if k != "step"})
    m.to_csv(tmp_path / "h.csv")
    again = TrainingMonitor.load(tmp_path / "h.csv")
    assert len(again.history) == len(m.history)
    rec = advise(task="regression", history=again)
    assert rec.diagnosis.facts["diverged"] and rec.optimizer.params["lr"] == pytest.approx(0.001)
    assert "diverged" in rec.explain()
    with pytest.raises(ValueError, match="^diagnose: the history has no train_loss values$"):
        diagnose([{"step": 1, "val_loss": 1.0}])
    with pytest.raises(ValueError, match="unknown metric"):
        m.log(1, accuracy=0.5)


# ---- lr_range_test -----------------------------------------------------------------------------------------
def test_lr_range_test_on_least_squares_stays_in_the_stable_range():
    torch.manual_seed(0)
    n, d = 256, 8
    X = torch.randn(n, d) * torch.linspace(0.5, 2.0, d)
    y = X @ torch.randn(d) + 0.01 * torch.randn(n)
    model = torch.nn.Linear(d, 1, bias=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    # full-batch gradient descent on mean squared error: stable iff lr < 2 / L, L = largest eigenvalue of 2 X^T X / n
    L = float(torch.linalg.eigvalsh(2 * X.T @ X / n).max())
    res = lr_range_test(model, lambda out, t: kernels.mse_loss(out.squeeze(1), t),
                        lambda p, lr: kernels.SGD(p, lr=lr), (X, y), start=1e-5, end=10, steps=120, batch_size=n)
    assert res.recommended is not None and 0 < res.recommended < 2 / L, (res.recommended, 2 / L, res.reasoning)
    assert res.stopped_early and res.lrs[-1] > 2 / L * 0.5
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(torch.get_rng_state(), rng)
    assert set(res.suggestions) == {"steepest", "valley", "min_div_10"}


@pytest.mark.parametrize("loss", ["MSELoss", "HuberLoss"])
@pytest.mark.parametrize("opt", ["Adam", "SGD"])
def test_lr_range_test_does_not_collapse_on_outlier_targets(opt, loss):
    """10% of the training targets 8-16 standard deviations off: the suggestion stays near the clean data's
    (before the trailing median it collapsed to 1.5e-5 here, 1,000x below: a model that barely moves)."""
    from optadvisor.advisor._examples import example_task

    def suggestion(name):
        model_fn, train, _ = example_task(name)
        torch.manual_seed(0)
        factory = ((lambda p, lr: kernels.Adam(p, lr=lr)) if opt == "Adam"
                   else (lambda p, lr: kernels.SGD(p, lr=lr, momentum=0.9)))
        return lr_range_test(model_fn(), getattr(kernels, loss)(), factory, train, start=1e-6, end=10.0,
                             steps=60).recommended

    clean, dirty = suggestion("diabetes"), suggestion("diabetes_outliers")
    assert clean is not None and dirty is not None
    assert clean / 10 <= dirty <= clean * 10, (clean, dirty)


def test_lr_range_test_refuses_with_too_few_points():
    X, y = torch.randn(64, 3), torch.randn(64)
    model = torch.nn.Linear(3, 1)
    res = lr_range_test(model, lambda o, t: kernels.mse_loss(o.squeeze(1), t), lambda p, lr: kernels.SGD(p, lr=lr),
                        (X, y), start=1e-3, end=1e3, steps=12)
    assert res.recommended is None and "too few" in res.reasoning
    with pytest.raises(ValueError, match="start < end"):
        lr_range_test(model, None, None, (X, y), start=1.0, end=0.1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        lr_range_test(torch.nn.ReLU(), None, None, (X, y))
    assert not math.isnan(sum(res.losses))


def test_cli_profile_and_diagnose(tmp_path, capsys):
    from optadvisor.advisor.cli import main

    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 2, generator=g)
    y = torch.randn(300, generator=g)
    y[:40] = 500.0
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("a,b,price\n" + "\n".join(f"{a},{b},{t}" for (a, b), t in zip(X.tolist(), y.tolist())))
    assert main(["profile", str(csv_path), "--target", "price"]) == 0
    out = capsys.readouterr().out
    assert "target_outlier_fraction" in out and "HuberLoss" in out
    labels = tmp_path / "c.csv"
    labels.write_text("x,kind\n" + "\n".join(f"{i},{'cat' if i % 3 else 'dog'}" for i in range(60)))
    assert main(["profile", str(labels), "--target", "kind"]) == 0
    assert "binary classification" in capsys.readouterr().out
    np.savez(tmp_path / "d.npz", X=X.numpy(), y=y.numpy())
    assert main(["profile", str(tmp_path / "d.npz"), "--json"]) == 0
    assert main(["profile", str(csv_path), "--target", "nope"]) == 2
    m = TrainingMonitor()
    for row in CONDITIONS["overfitting"]:
        m.log(row["step"], **{k: v for k, v in row.items() if k != "step"})
    m.to_csv(tmp_path / "h.csv")
    assert main(["diagnose", str(tmp_path / "h.csv")]) == 0
    assert "overfitting" in capsys.readouterr().out
    (tmp_path / "empty.csv").write_text("step,val_loss\n1,0.5\n")
    assert main(["diagnose", str(tmp_path / "empty.csv")]) == 2


def test_feature_sparsity_counts_exact_zeros_among_known_values():
    """One-hot / bag-of-words data: the share of exact zeros, NaNs left out of both counts, integer
    features counted too; dense data is far below the rules' 0.9."""
    X = torch.zeros(200, 40)
    X[torch.arange(200), torch.arange(200) % 40] = 1.0     # one-hot: 39 of 40 values are zero
    X[0, 5] = float("nan")
    prof = profile_data(X, torch.randn(200))
    assert prof.facts.feature_sparsity == pytest.approx((200 * 39 - 1) / (200 * 40 - 1))
    assert "exactly zero" in prof.evidence["feature_sparsity"]
    ints = profile_data(torch.tensor([[0, 1], [0, 0], [2, 0]]), torch.tensor([0.0, 1.0, 2.0]))
    assert ints.facts.feature_sparsity == pytest.approx(4 / 6)
    dense = profile_data(torch.randn(300, 5), torch.randn(300))
    assert dense.facts.feature_sparsity == 0.0


# Every threshold of diagnose() at and beside its boundary, and each finding whole: which facts are set, the
# steps and numbers it names, its message. 20 records (unless said): the running median's window is 3, the
# first 10% (2 records) are warm-up, the last quarter is 5 records, mid-run is record 10. Values are chosen
# so that the smoothed curve and each ratio are exact in binary floating point where a boundary is tested.
def _h(loss, grad=None, val=None, lr=0.01):
    rows = []
    for i, v in enumerate(loss):
        row = {"step": i, "train_loss": v, "lr": lr[i] if isinstance(lr, list) else lr}
        g = 1.0 if grad is None else grad[i]
        if g is not None:
            row["grad_norm"] = g
        if val and i in val:
            row["val_loss"] = val[i]
        rows.append(row)
    return rows


_INF, _NAN = float("inf"), float("nan")
_DOWN = [2.0 - 0.05 * i for i in range(20)]  # falls 47.5% in a straight line: nothing abnormal
_QUIET = {"grad_norm_p90": 1.0, "last_lr": 0.01}
DIAGNOSES = {
    "non-finite loss": (_h([1.0] * 5 + [_NAN, 1.0, _INF] + [1.0] * 4), {"diverged"}, _QUIET, [
        ("diverged", [5, 7], {}, "training loss is not finite from step 5 (2 records)")]),
    "smoothed loss 5x its best": (_h([0.5] * 10 + [2.5] * 10), {"diverged"}, _QUIET, [
        ("diverged", [10], {"best": 0.5, "peak": 2.5}, "smoothed loss reached 2.5 at step 10, over 4x its best 0.5")]),
    "peak exactly 4x its best: a plateau, not divergence": (_h([0.5] * 10 + [2.0] * 10), {"plateau"}, _QUIET, [
        ("plateau", [15, 19], {"start": 2.0, "end": 2.0},
         "over the last 5 records (steps 15-19) the smoothed loss moved from 2 to 2 (< 1% better)")]),
    "back to exactly 2x its best": (_h([0.5] * 10 + [2.5] * 5 + [1.0] * 5), {"plateau"}, _QUIET, [
        ("plateau", [15, 19], {"start": 1.0, "end": 1.0},
         "over the last 5 records (steps 15-19) the smoothed loss moved from 1 to 1 (< 1% better)")]),
    "ends 2.5x its best": (_h([0.5] * 10 + [2.5] * 5 + [1.25] * 5), {"diverged"}, _QUIET, [
        ("diverged", [10], {"best": 0.5, "peak": 2.5}, "smoothed loss reached 2.5 at step 10, over 4x its best 0.5")]),
    "8 records are enough": (_h([0.5] * 4 + [2.5] * 4), {"diverged"}, _QUIET, [
        ("diverged", [4], {"best": 0.5, "peak": 2.5}, "smoothed loss reached 2.5 at step 4, over 4x its best 0.5")]),
    "7 are not": (_h([0.5] * 4 + [2.5] * 3), set(), _QUIET, []),
    "flat at 8 records": (_h([1.0] * 8), {"plateau"}, _QUIET, [
        ("plateau", [6, 7], {"start": 1.0, "end": 1.0},
         "over the last 2 records (steps 6-7) the smoothed loss moved from 1 to 1 (< 1% better)")]),
    "last quarter exactly 1% better": (_h([200.0] * 4 + [100.0] * 12 + [99.5, 99.0, 99.0, 99.0]), set(), _QUIET, []),
    "last quarter 0.5% better": (_h([200.0] * 4 + [100.0] * 11 + [99.5] * 2 + [99.0] * 3), {"plateau"}, _QUIET, [
        ("plateau", [15, 19], {"start": 99.5, "end": 99.0},
         "over the last 5 records (steps 15-19) the smoothed loss moved from 99.5 to 99 (< 1% better)")]),
    "converged to zero: no plateau": (_h([1.0] * 10 + [0.0] * 10), set(), _QUIET, []),
    "gradient spikes": (_h(_DOWN, grad=[0.5] * 7 + [5.5] + [0.5] * 4 + [5.0] + [0.5] * 2 + [_INF] + [0.5] * 4),
                        {"exploding_gradients"}, {"grad_norm_p90": 5.0, "last_lr": 0.01}, [
        ("exploding_gradients", [7, 15], {"median": 0.5, "p90": 5.0},
         "gradient norm above 10x its median 0.5 (or not finite) at 2 steps, first 7; clip at about the 90th "
         "percentile 5")]),
    "median gradient norm 0": (_h(_DOWN, grad=[0.0] * 19 + [1.0]), set(), {"grad_norm_p90": 0.0, "last_lr": 0.01}, []),
    "90th percentile of 10 norms": (_h(_DOWN, grad=[float(i + 1) for i in range(10)] + [None] * 10), set(),
                                    {"grad_norm_p90": 10.0, "last_lr": 0.01}, []),
    "no gradient norms, no learning rate": (_h(_DOWN, grad=[None] * 20, lr=0.0), set(), {}, []),
    "rising exactly 10% since mid-run": (_h([1.0] * 15 + [1.1] * 5), {"plateau"}, _QUIET, [
        ("plateau", [15, 19], {"start": 1.1, "end": 1.1},
         "over the last 5 records (steps 15-19) the smoothed loss moved from 1.1 to 1.1 (< 1% better)")]),
    "rising 12.5%": (_h([1.0] * 15 + [1.125] * 5), {"plateau", "loss_rising"}, _QUIET, [
        ("plateau", [15, 19], {"start": 1.125, "end": 1.125},
         "over the last 5 records (steps 15-19) the smoothed loss moved from 1.125 to 1.125 (< 1% better)"),
        ("loss_rising", [10, 19], {"mid": 1.0, "end": 1.125},
         "smoothed training loss rose from 1 (step 10) to 1.125 (step 19)")]),
    "steady but slow": (_h([1.0 - 0.01 * i for i in range(20)]), {"lr_too_low"}, _QUIET, [
        ("lr_too_low", [0, 19], {"total_decrease": (0.995 - 0.815) / 0.995},
         "the loss falls steadily (19/19 smoothed steps down) but only 18% over steps 0-19: the learning rate "
         "is likely too low")]),
    "steady, 22.6% in all": (_h([1.0 - 0.0125 * i for i in range(20)]), set(), _QUIET, []),
    "noisy": (_h([1.0 + (0.5 if i % 2 else -0.5) for i in range(20)]), {"plateau", "noisy_loss"}, _QUIET, [
        ("plateau", [15, 19], {"start": 0.5, "end": 1.0},
         "over the last 5 records (steps 15-19) the smoothed loss moved from 0.5 to 1 (< 1% better)"),
        ("noisy_loss", [10, 19], {"relative_spread": 0.8 * 1.4826},
         "in the second half the loss scatters by 119% of its level around the smoothed curve")]),
    "validation rises twice past 5% while training falls": (
        _h(_DOWN, val={0: 1.1, 4: 1.0, 8: 1.2, 12: 1.3}), {"overfitting"}, _QUIET, [
            ("overfitting", [4, 12], {"val_min": 1.0, "val_end": 1.3},
             "validation loss rose from its minimum 1 (step 4) to 1.3 (step 12) while training loss fell from 1.8 "
             "to 1.4: stop early or regularize")]),
    "validation at exactly 5% above its minimum twice": (
        _h(_DOWN, val={0: 1.2, 4: 1.0, 8: 1.05, 12: 1.05, 16: 1.3}), set(), _QUIET, []),
    "validation ends exactly 5% above its minimum": (
        _h(_DOWN, val={0: 1.2, 4: 1.0, 8: 1.2, 12: 1.3, 16: 1.05}), set(), _QUIET, []),
    "validation rises while training stays flat": (
        _h([1.0] * 20, val={0: 1.1, 4: 1.0, 8: 1.2, 12: 1.3}), {"plateau"}, _QUIET, [
            ("plateau", [15, 19], {"start": 1.0, "end": 1.0},
             "over the last 5 records (steps 15-19) the smoothed loss moved from 1 to 1 (< 1% better)")]),
    "three validation records are too few": (_h(_DOWN, val={4: 1.0, 8: 1.2, 12: 1.3}), set(), _QUIET, []),
    "no finite gradient norm": (_h(_DOWN, grad=[_INF] * 20), {"exploding_gradients"}, {"last_lr": 0.01}, [
        ("exploding_gradients", list(range(10)), {"median": _NAN, "p90": _NAN},
         "gradient norm above 10x its median nan (or not finite) at 20 steps, first 0; clip at about the 90th "
         "percentile nan")]),
    "the last positive learning rate": (_h(_DOWN, lr=[0.1] * 10 + [0.05] * 8 + [0.01, 0.0]), set(), _QUIET, []),
    "steady, exactly 20% in all": (_h([5.0, 5.0] + [4.95 - 0.05 * i for i in range(16)] + [4.0, 4.0]), set(),
                                   _QUIET, []),
    "low only in the warm-up: not divergence": (_h([0.5, 0.5] + [2.5] * 18), {"plateau"}, _QUIET, [
        ("plateau", [15, 19], {"start": 2.5, "end": 2.5},
         "over the last 5 records (steps 15-19) the smoothed loss moved from 2.5 to 2.5 (< 1% better)")]),
    "from zero at mid-run: no rise measured, no divergence": (_h([0.0] * 15 + [1.0] * 5), {"plateau"}, _QUIET, [
        ("plateau", [15, 19], {"start": 1.0, "end": 1.0},
         "over the last 5 records (steps 15-19) the smoothed loss moved from 1 to 1 (< 1% better)")]),
    "up 20% but back down at the last record": (_h([1.0] * 15 + [1.2] * 4 + [0.9]), set(), _QUIET, []),
    "training ends between its last two values before the validation minimum": (
        _h(_DOWN[:5] + [1.82] * 15, val={0: 1.1, 4: 1.0, 8: 1.2, 12: 1.3}), {"plateau"}, _QUIET, [
            ("plateau", [15, 19], {"start": 1.82, "end": 1.82},
             "over the last 5 records (steps 15-19) the smoothed loss moved from 1.82 to 1.82 (< 1% better)")]),
    "validation recorded after the last training record": (
        _h(_DOWN, val={0: 1.1, 4: 1.0, 8: 1.2}) + [{"step": 25, "val_loss": 1.3}], {"overfitting"}, _QUIET, [
            ("overfitting", [4, 25], {"val_min": 1.0, "val_end": 1.3},
             "validation loss rose from its minimum 1 (step 4) to 1.3 (step 25) while training loss fell from 1.8 "
             "to 1.05: stop early or regularize")]),
    "slow but up and down (4 of 11 smoothed steps down)": (
        _h([1.0 - 0.004 * i + (0.03 if (i // 2) % 2 else 0.0) for i in range(20)]), set(), _QUIET, []),
}
_ALL_FACTS = ("diverged", "exploding_gradients", "plateau", "noisy_loss", "overfitting", "loss_rising", "lr_too_low")


def _measured(history) -> set[str]:
    """The facts a history can settle (a fact it cannot is unknown, not false): divergence from 8 finite
    losses (or one that is not finite), the curve's shape from 8 unless it diverged, exploding gradients
    from any grad_norm, overfitting from 4 finite val_loss values."""
    losses = [r["train_loss"] for r in history if "train_loss" in r]
    finite = [v for v in losses if math.isfinite(v)]
    val = [r["val_loss"] for r in history if "val_loss" in r]
    measured = {"diverged"} if len(finite) >= 8 or len(finite) < len(losses) else set()
    if any("grad_norm" in r for r in history):
        measured.add("exploding_gradients")
    if len(val) >= 4 and all(map(math.isfinite, val)):
        measured.add("overfitting")
    if len(finite) >= 8:
        measured |= {"plateau", "noisy_loss", "loss_rising", "lr_too_low"}
    return measured


@pytest.mark.parametrize("case", list(DIAGNOSES))
def test_diagnose_at_each_threshold_names_its_evidence(case):
    history, found, numbers, findings = DIAGNOSES[case]
    d = diagnose(history)
    measured = _measured(history)
    if "diverged" in found:  # the curve's shape is not judged once the loss diverged
        measured -= {"plateau", "noisy_loss", "loss_rising", "lr_too_low"}
    assert d.facts == {**{f: f in found for f in _ALL_FACTS if f in measured}, **numbers}, d.explain()
    assert set(d.unknown) == set(_ALL_FACTS) - measured
    got = [(f.fact, f.steps, f.numbers, f.message) for f in d.findings]
    assert got == [(fact, steps, pytest.approx(nums, nan_ok=True), msg) for fact, steps, nums, msg in findings]
    assert d.n_records == len(history)


def test_diagnosis_explains_every_finding_on_its_own_line():
    d = diagnose(DIAGNOSES["rising 12.5%"][0])
    assert d.explain() == (
        "Diagnosis of 20 records:\n"
        "  - plateau: over the last 5 records (steps 15-19) the smoothed loss moved from 1.125 to 1.125 (< 1% better)\n"
        "  - loss_rising: smoothed training loss rose from 1 (step 10) to 1.125 (step 19)\n"
        "  ? overfitting unknown: log val_loss (at least 4 finite values; the history has 0)")
    assert diagnose(_h(_DOWN, val={0: 1.0, 4: 0.9, 8: 0.8, 12: 0.7})).explain() == (
        "Diagnosis of 20 records: nothing abnormal found.")


def test_diagnose_keeps_the_first_ten_steps_of_a_finding():
    d = diagnose(_h([1.0] * 3 + [_NAN] * 12 + [1.0] * 5))
    assert d.findings[0].steps == list(range(3, 13))
    assert d.findings[0].message == "training loss is not finite from step 3 (12 records)"


def test_monitor_log_takes_numbers_and_refuses_what_it_cannot_record():
    m = TrainingMonitor()
    m.log(3, train_loss=torch.tensor(0.5), grad_norm=np.float32(2.0), val_loss=None)
    assert m.history == [{"step": 3, "train_loss": 0.5, "grad_norm": 2.0}]
    assert all(type(v) in (int, float) for v in m.history[0].values())
    for step, got in ((1.0, "float"), (True, "bool"), ("1", "str")):
        with pytest.raises(TypeError, match=r"^TrainingMonitor.log: 'step' must be an int \(got " + got + r"\)$"):
            m.log(step, train_loss=1.0)
    with pytest.raises(ValueError, match=r"^TrainingMonitor.log: unknown metric\(s\) \['acc', 'loss'\]; known: "
                                         r"train_loss, val_loss, grad_norm, lr$"):
        m.log(1, loss=1.0, acc=0.5, lr=0.1)
    assert len(m.history) == 1


@pytest.mark.parametrize("name, text, message", [
    ("h.json", '[{"step": 0, "train_loss": 1}, {"train_loss": 2}]', ": record 2: no 'step'"),
    ("h.json", '[{"step": 0, "train_loss": 1}, 5]', ": record 2: expected a mapping of column names to numbers"),
    ("h.json", '[{"step": 1.5, "train_loss": 1}]', ": record 1: step must be a finite integer (got 1.5)"),
    ("h.json", '{"step": 1}', ": a history is a list of records"),
    ("h.json", '[{"step": 0, "train_loss": 1}, {"step": 1, "accuracy": 1}]',
     ": record 2: TrainingMonitor.log: unknown metric(s) ['accuracy']; known: train_loss, val_loss, grad_norm, lr"),
    ("h.json", '[{"step": 0, "train_loss": 1', ":1: malformed JSON: Expecting ',' delimiter"),
    ("h.csv", "step,train_loss\n0,1\n1,x\n", ": record 2: could not convert string to float: 'x'"),
    ("h.csv", "step,train_loss\n0," + "1" * 200_000 + "\n", ": malformed CSV: field larger than field limit (131072)"),
    ("h.csv", "step,train_loss\n0,1\n\n2,1\n2.5,1\n", ": record 3: step must be a finite integer (got '2.5')"),
])
def test_monitor_load_names_the_file_and_record(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        TrainingMonitor.load(path)
    assert str(info.value) == f"{path}{message}"


def test_monitor_load_reads_what_to_csv_wrote(tmp_path):
    m = TrainingMonitor()
    m.log(0, train_loss=1.5, lr=0.1)
    m.log(1, train_loss=1.25, val_loss=2.0, grad_norm=0.5, lr=0.1)
    m.to_csv(tmp_path / "h.csv")
    assert (tmp_path / "h.csv").read_text().splitlines()[0] == "step,train_loss,val_loss,grad_norm,lr"
    assert TrainingMonitor.load(tmp_path / "h.csv").history == m.history
    with pytest.raises(ValueError, match=r"^" + re.escape(str(tmp_path / "none.csv")) +
                       r": cannot read training history: No such file or directory$"):
        TrainingMonitor.load(tmp_path / "none.csv")



def test_a_fact_the_history_cannot_settle_is_unknown_and_says_what_to_log():
    """No val_loss: overfitting is unknown (it was reported False); no grad_norm: exploding_gradients too;
    the explanation names the field that would settle each."""
    d = diagnose([{"step": i, "train_loss": 2.0 - 0.05 * i} for i in range(20)])
    assert "overfitting" not in d.facts and "exploding_gradients" not in d.facts
    assert d.facts["plateau"] is False and d.facts["diverged"] is False
    assert d.unknown == {"exploding_gradients": "log grad_norm (the gradient's norm each step)",
                         "overfitting": "log val_loss (at least 4 finite values; the history has 0)"}
    assert d.explain() == ("Diagnosis of 20 records: nothing abnormal found.\n"
                           "  ? exploding_gradients unknown: log grad_norm (the gradient's norm each step)\n"
                           "  ? overfitting unknown: log val_loss (at least 4 finite values; the history has 0)")


def test_records_are_read_in_step_order():
    """A falling loss stored newest-first is a falling loss (it was called diverged); a train and a
    validation record of one step are merged; one metric twice for a step is refused."""
    rows = [{"step": i, "train_loss": 2.0 - 0.05 * i} for i in range(20)]
    forward, backward = diagnose(rows), diagnose(rows[::-1])
    assert backward.facts == forward.facts and not backward.findings
    split = rows + [{"step": i, "val_loss": 1.0} for i in range(0, 20, 4)]
    assert diagnose(split).facts["overfitting"] is False
    with pytest.raises(ValueError, match=r"^diagnose: step 3 has two values of train_loss \(1.85 and 9.0\); "
                                         r"log each metric once per step$"):
        diagnose(rows + [{"step": 3, "train_loss": 9.0}])


@given(values=st.lists(st.one_of(st.floats(-1e6, 1e6), st.sampled_from([0.0, -0.0, 1.0, 1.0])), max_size=80),
       window=st.integers(1, 40))
@settings(max_examples=200, deadline=None)
def test_running_median_is_the_windows_median(values, window):
    """The sliding-window median equals each window's median computed from scratch (what it replaced:
    quadratic, 21-45 s for 60k-80k records)."""
    import statistics

    from optadvisor.advisor._monitor import _running_median

    half = max(1, window // 2)
    want = [statistics.median(values[max(0, i - half): i + half + 1]) for i in range(len(values))]
    assert _running_median(values, window) == want
