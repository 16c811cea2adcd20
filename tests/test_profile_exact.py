"""profile_data's facts and evidence exactly: each model kind and why, the free-memory reading (CPU and CUDA,
and where it cannot be read), quantiles, batching of tensors, Datasets (map-style and iterable) and
DataLoaders, the task inference's edges, and the evidence strings character for character."""

from __future__ import annotations

import io
import math

import pytest
import torch

import optadvisor.advisor._data as data
from optadvisor.advisor import profile_data


# ---- the model: its kind, trainable size and free memory ------------------------------------------------------
class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(8, 2)
        self.conv = torch.nn.Conv1d(1, 1, 3)


class _RecurrentConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = torch.nn.GRU(4, 4)
        self.conv = torch.nn.Conv2d(1, 1, 3)


MODELS = [
    (lambda: torch.nn.TransformerEncoderLayer(8, 2, 16), "transformer", "it has attention layers"),
    (lambda: torch.nn.TransformerDecoderLayer(8, 2, 16), "transformer", "it has attention layers"),
    (_Attention, "transformer", "it has attention layers"),
    (lambda: torch.nn.LSTM(6, 4), "rnn", "it has recurrent layers (RNN/LSTM/GRU)"),
    (lambda: torch.nn.RNN(6, 4), "rnn", "it has recurrent layers (RNN/LSTM/GRU)"),
    (_RecurrentConv, "rnn", "it has recurrent layers (RNN/LSTM/GRU)"),
    (lambda: torch.nn.Conv1d(1, 2, 3), "cnn", "it has convolution layers"),
    (lambda: torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)), "cnn",
     "it has convolution layers"),
    (lambda: torch.nn.Linear(6, 4), "linear", "it is a single Linear layer"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Sigmoid()), "linear", "it is a single Linear layer"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Dropout()), "other",
     "no attention, recurrent, convolution or Linear layers recognized"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)), "mlp",
     "it stacks 2 Linear layers"),
    (lambda: torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(5)]), "mlp", "it stacks 5 Linear layers"),
    (lambda: torch.nn.Embedding(10, 4), "other", "no attention, recurrent, convolution or Linear layers recognized"),
]


@pytest.mark.parametrize("make, kind, why", MODELS, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(MODELS)])
def test_each_model_kind_and_its_evidence(make, kind, why, monkeypatch):
    monkeypatch.setattr(data, "_free_memory", lambda device: (1.5, "1.5 GiB free somewhere"))
    model = make()
    n = sum(p.numel() for p in model.parameters())
    prof = data.profile_model(model)
    facts, evidence = prof.facts, prof.evidence
    assert facts == {"n_params": n, "model_kind": kind, "memory_gb": 1.5}
    assert sum(prof.params_by_kind.values()) == n
    assert evidence == {"n_params": f"{n:,} trainable parameters", "model_kind": f"{kind}: {why}",
                        "memory_gb": "1.5 GiB free somewhere"}


def test_only_trainable_parameters_count_and_unreadable_memory_is_left_out(monkeypatch):
    monkeypatch.setattr(data, "_free_memory", lambda device: None)
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.ReLU(), torch.nn.Linear(1000, 3))
    model[0].weight.requires_grad_(False)
    prof = data.profile_model(model)
    facts, evidence = prof.facts, prof.evidence
    assert facts == {"n_params": 1000 + 3003, "model_kind": "mlp"}
    assert prof.params_by_kind["linear"] == 1000 + 3003
    assert evidence["n_params"] == "4,003 trainable parameters" and "memory_gb" not in evidence
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"^profile_model: the model has no trainable parameters \(all frozen"):
        data.profile_model(model)
    with pytest.raises(ValueError, match=r"^profile_data: model: the model has no trainable parameters \(all"):
        data.profile_data(torch.zeros(4, 1000), torch.zeros(4), model=model)
    with pytest.raises(TypeError, match=r"^profile_model: model must be a torch.nn.Module \(got list\)$"):
        data.profile_model([torch.nn.Parameter(torch.zeros(2))])


class _TinyLM(torch.nn.Module):
    """Embedding, a learned position table (a bare parameter), one encoder layer, a head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 8)
        self.pos = torch.nn.Parameter(torch.zeros(5, 8))
        self.block = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight


def test_parameters_are_counted_by_the_kind_of_module_that_owns_them(monkeypatch):
    monkeypatch.setattr(data, "_free_memory", lambda device: None)
    prof = data.profile_model(_TinyLM())
    # attention: in_proj 8x24 + 24, out_proj (a Linear inside MultiheadAttention) 8x8 + 8 counts as linear;
    # linear: out_proj 72, linear1 8x16 + 16, linear2 16x8 + 8; norms: two LayerNorms of 8 + 8;
    # embedding: 11x8 once (the tied head adds nothing); other: the position table 5x8
    assert prof.params_by_kind == {"conv": 0, "linear": 72 + 144 + 136, "norm": 32, "embedding": 88,
                                   "attention": 8 * 24 + 24, "recurrent": 0, "other": 40}
    assert prof.attention is True and prof.facts == {"n_params": 88 + 40 + 216 + 352 + 32, "model_kind": "transformer"}
    assert "parameters by kind: linear 352, norm 32, embedding 88, attention 216, other 40" in prof.explain()
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.GRU(4, 2))
    kinds = data.profile_model(cnn).params_by_kind
    assert (kinds["conv"], kinds["norm"], kinds["recurrent"]) == (40, 8, 3 * (4 * 2 + 2 * 2 + 2 + 2))
    assert data.profile_model(cnn).attention is False


def _meminfo(text):
    def fake_open(path, *args, **kwargs):
        assert path == "/proc/meminfo"
        if isinstance(text, Exception):
            raise text
        return io.StringIO(text)
    return fake_open


@pytest.mark.parametrize("text, expect", [
    ("MemTotal:       8388608 kB\nMemFree:     1 kB\nMemAvailable:    3145728 kB\nBuffers: 5 kB\n",
     (3.0, "3.0 GiB available on the host (/proc/meminfo MemAvailable)")),
    ("MemAvailable: 1572864 kB\n", (1.5, "1.5 GiB available on the host (/proc/meminfo MemAvailable)")),
    ("MemTotal: 8388608 kB\nMemFree: 4194304 kB\n", None),   # an old kernel: no MemAvailable
    ("MemAvailable: lots kB\n", None),
    (OSError("no /proc here"), None),
])
def test_free_memory_on_the_cpu_reads_memavailable(text, expect, monkeypatch):
    monkeypatch.setattr(data, "open", _meminfo(text), raising=False)
    assert data._free_memory(torch.device("cpu")) == expect


def test_free_memory_on_cuda_and_elsewhere(monkeypatch):
    seen = []

    def mem_get_info(device):
        seen.append(device)
        return 3 * 2**30 + 2**29, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert data._free_memory(torch.device("cuda", 1)) == (3.5, "3.5 GiB free on cuda:1 (torch.cuda.mem_get_info)")
    assert seen == [torch.device("cuda", 1)]

    def broken(device):
        raise RuntimeError("CUDA driver version is insufficient")

    monkeypatch.setattr(torch.cuda, "mem_get_info", broken)
    assert data._free_memory(torch.device("cuda")) is None
    assert data._free_memory(torch.device("meta")) is None


# ---- quantiles and batches ------------------------------------------------------------------------------------
def test_quantiles_interpolate_linearly():
    assert math.isnan(data._quantile([], 0.5))
    assert data._quantile([5.0], 0.0) == data._quantile([5.0], 0.9) == 5.0
    v = [1.0, 2.0, 3.0, 4.0]
    assert [data._quantile(v, q) for q in (0.0, 0.25, 0.5, 0.75, 1.0)] == [1.0, 1.75, 2.5, 3.25, 4.0]
    assert data._quantile([0.0, 10.0, 30.0], 0.75) == 20.0


def test_tensors_come_in_batches_of_the_given_size():
    X, y = torch.arange(14.0).view(7, 2), torch.arange(7)
    got = list(data._batches(X, y, batch=3))
    assert [tuple(xb.shape) for xb, _ in got] == [(3, 2), (3, 2), (1, 2)]
    assert torch.equal(torch.cat([yb for _, yb in got]), y) and torch.equal(torch.cat([xb for xb, _ in got]), X)
    assert [tuple(xb.shape) for xb, _ in data._batches(X, y)] == [(7, 2)]  # 65,536 by default


class _Samples(torch.utils.data.IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        for i in range(self.n):
            yield torch.randn(6, generator=gen), torch.tensor(i % 3)


def test_datasets_are_batched_and_loaders_are_read_as_they_batch():
    """A map-style or iterable Dataset yields samples and is batched by 1,024; a DataLoader's batches are
    read as they come; a loader that does not yield (features, target) pairs is refused."""
    X, y = torch.randn(2500, 6), torch.randint(0, 3, (2500,))
    ds = torch.utils.data.TensorDataset(X, y)
    assert [xb.shape[0] for xb, _ in data._batches(ds, None)] == [1024, 1024, 452]
    loader = torch.utils.data.DataLoader(ds, batch_size=700)
    assert [xb.shape[0] for xb, _ in data._batches(loader, None)] == [700, 700, 700, 400]
    assert [xb.shape[0] for xb, _ in data._batches(_Samples(1500), None)] == [1024, 476]
    prof = profile_data(_Samples(300))
    assert (prof.facts.n_samples, prof.facts.n_features, prof.facts.class_counts) == (300, 6, [100, 100, 100])
    with pytest.raises(ValueError, match=r"^profile_data: a Dataset/DataLoader must yield \(features, target\) "
                                         r"pairs$"):
        list(data._batches([torch.zeros(3)], None))
    with pytest.raises(ValueError, match=r"must yield \(features, target\) pairs"):
        list(data._batches([(torch.zeros(3),)], None))


# ---- facts and evidence, exactly ------------------------------------------------------------------------------
def test_regression_evidence_exactly():
    y = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0, 2.5, 3.5, 1.5])
    X = torch.tensor([[0.0, 1.0]] * 8)
    prof = profile_data(X, y)
    # quartiles 1.875 / 3.625 (IQR 1.75): the fence is [-3.375, 8.875]; 100 is beyond it; MAD 1.0
    assert prof.facts.known() == {  # what profile_data found (pretrained stays at its default, False)
        "task": "regression", "n_samples": 8, "n_features": 2, "feature_sparsity": 0.5,
        "target_outlier_fraction": 0.125, "target_scale": 1.4826 * 1.0}
    assert prof.evidence == {
        "n_samples": "8 examples", "n_features": "2 features per example",
        "feature_sparsity": "50.0% of the 16 known feature values are exactly zero",
        "task": "regression: the target has 8 distinct real values: a quantity to predict",
        "target_outlier_fraction": "12.50% of all targets lie beyond 3 IQR of the quartiles [-3.375, 8.875]",
        "target_scale": "1.4826 x MAD = 1.483 (median 2.75)"}
    assert prof.explain() == "Data profile:\n" + "\n".join(f"  {k}: {v}" for k, v in prof.evidence.items())
    assert (prof.nan_in_features, prof.nan_in_target, prof.class_labels) == (0, 0, None)


def test_classification_evidence_exactly():
    y = torch.tensor([0] * 6 + [1] * 3 + [2] * 2 + [3] * 1 + [4] * 1 + [5] * 1 + [6] * 1 + [7] * 1 + [8] * 1
                     + [9] * 1 + [10] * 1 + [11] * 1)
    prof = profile_data(torch.ones(len(y), 3), y)
    counts = [6, 3, 2] + [1] * 9
    assert prof.facts.class_counts == counts and prof.facts.task == "classification"
    assert prof.evidence["task"] == ("classification: the target takes 12 distinct integer values "
                                     "(<= max(20, sqrt(n)) = 20): classes")
    assert prof.evidence["class_counts"] == "12 classes, counts [6, 3, 2, 1, 1, 1, 1, 1, 1, 1] ...; largest/smallest = 6"
    assert prof.evidence["feature_sparsity"] == "0.0% of the 60 known feature values are exactly zero"
    binary = profile_data(torch.zeros(10, 1), torch.tensor([3.0, 5.0] * 5))
    assert binary.evidence["task"] == "classification: the target has exactly 2 distinct values: binary classification"
    assert binary.evidence["class_labels"] == (
        "the labels are not 0..1: class index i is the i-th smallest label (3->0, 5->1); counts, class weights "
        "and the model's outputs follow that order, so train on the indices "
        "(torch.searchsorted(torch.tensor(profile.class_labels), y))")
    seven = profile_data(torch.zeros(70, 1), torch.arange(70) % 7 + 10)
    assert seven.evidence["class_labels"].endswith(
        "smallest label (10->0, 11->1, 12->2, 13->3, 14->4, 15->5 ...); counts, class weights and the model's "
        "outputs follow that order, so train on the indices (torch.searchsorted(torch.tensor(profile.class_labels), y))")


@pytest.mark.parametrize("n, distinct, task", [
    (400, 20, "classification"),    # 20 <= max(20, sqrt(400) = 20)
    (400, 21, "regression"),
    (900, 30, "classification"),    # sqrt(900) = 30
    (900, 31, "regression"),
    (21, 21, "regression"),         # as many values as examples: a quantity, not classes
])
def test_integer_targets_are_classes_up_to_max_20_sqrt_n(n, distinct, task):
    y = torch.arange(n) % distinct
    prof = profile_data(torch.randn(n, 2), y)
    assert prof.facts.task == task
    if task == "regression":
        assert prof.evidence["task"] == (f"regression: the target has {distinct} distinct integer values: "
                                         "a quantity to predict")


def test_many_distinct_values_and_given_task():
    y = torch.arange(1500, dtype=torch.float32) / 7
    prof = profile_data(torch.randn(1500, 2), y)
    assert prof.evidence["task"] == "regression: the target has more than 1,000 distinct real values: a quantity to predict"
    given = profile_data(torch.randn(40, 2), torch.arange(40) % 2, task="regression")
    assert given.facts.task == "regression" and given.evidence["task"] == "regression: given by the caller"
    assert given.facts.class_counts is None


def test_missing_values_evidence_exactly():
    X, y = torch.ones(20, 2), torch.arange(20.0)
    X[0, 0] = X[3, 1] = float("nan")
    y[5] = float("nan")
    prof = profile_data(X, y)
    assert prof.evidence["missing"] == ("2 missing (NaN) feature values and 1 missing targets; the facts describe "
                                        "the rest (impute or drop them before training)")
    assert prof.evidence["feature_sparsity"] == "0.0% of the 38 known feature values are exactly zero"
    assert prof.facts.n_samples == 20 and (prof.nan_in_features, prof.nan_in_target) == (2, 1)


@pytest.mark.parametrize("X, y, exc, message", [
    (torch.zeros(4, 2, dtype=torch.complex64), torch.zeros(4), TypeError,
     r"^profile_data: features must be numeric \(got torch.complex64\)$"),
    (torch.zeros(4, 2), torch.zeros(4, dtype=torch.complex64), TypeError,
     r"^profile_data: the target must be real \(got torch.complex64\)$"),
    (torch.zeros(4, 2), torch.zeros(4, 2), ValueError, r"^profile_data: one target per example expected \(got 2\)$"),
    (torch.zeros(4, 2), torch.tensor([0.0, 1.0, 2.0, float("inf")]), ValueError,
     r"^profile_data: the target has infinite values; fix or drop them first$"),
    (torch.tensor([[0.0], [float("-inf")]]), torch.zeros(2), ValueError,
     r"^profile_data: the features have infinite values; fix or drop them first$"),
])
def test_bad_data_messages_exactly(X, y, exc, message):
    with pytest.raises(exc, match=message):
        profile_data(X, y)


def test_non_numeric_arrays_are_refused_with_what_to_do():
    import numpy as np

    with pytest.raises(TypeError, match=r"^profile_data: X and y must be numeric tensors or arrays \(encode string "
                                        r"labels as integers first\): "):
        profile_data(np.zeros((3, 2)), np.array(["a", "b", "c"]))


def test_the_distinct_count_keeps_growing_up_to_the_cap_across_batches():
    """A first batch with exactly 1,000 distinct values does not stop the count: the next batch's new values
    make it 'more than 1,000'."""
    y = torch.cat([torch.arange(1000, dtype=torch.float64) + 0.5, torch.tensor([5000.5, 6000.5], dtype=torch.float64)])
    prof = profile_data(_loader(torch.zeros(1002, 1), y, 1000))
    assert prof.evidence["task"] == "regression: the target has more than 1,000 distinct real values: a quantity to predict"


def test_rows_with_different_feature_counts_are_refused():
    loader = [(torch.zeros(3, 2), torch.zeros(3)), (torch.zeros(3, 5), torch.zeros(3))]
    with pytest.raises(ValueError, match=r"^profile_data: rows have 2 and 5 features$"):
        profile_data(loader)


def test_integer_and_bool_features_are_read():
    X = torch.tensor([[0, 1], [2, 0], [0, 0], [1, 1]], dtype=torch.int8)
    prof = profile_data(X, torch.tensor([0.5, 1.5, 2.5, 3.75]))
    assert prof.facts.feature_sparsity == 0.5 and prof.facts.n_features == 2
    assert profile_data(X.bool(), torch.tensor([0.5, 1.5, 2.5, 3.75])).facts.feature_sparsity == 0.5


# ---- across batches, at the boundaries ------------------------------------------------------------------------
def _loader(X, y, batch):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=batch)


def test_counts_accumulate_across_batches():
    """NaNs, zeros, known entries and integrality are summed over every batch, not kept from the last one;
    a last batch of one row is read as one row."""
    X = torch.ones(5, 2)
    X[0, 0] = float("nan")   # batch 1
    X[3, 1] = float("nan")   # batch 2
    X[1, :] = 0.0            # batch 1: two zeros
    X[4, 0] = 0.0            # batch 3 (one row): one zero
    y = torch.tensor([0.5, float("nan"), 1.0, float("nan"), 2.0])
    prof = profile_data(_loader(X, y, 2))
    assert (prof.nan_in_features, prof.nan_in_target, prof.facts.n_samples, prof.facts.n_features) == (2, 2, 5, 2)
    assert prof.facts.feature_sparsity == 3 / 8
    assert prof.evidence["feature_sparsity"] == "37.5% of the 8 known feature values are exactly zero"
    assert prof.facts.task == "regression"  # 0.5 in the first batch: not integral, whatever later batches hold
    later_inf = torch.ones(5, 2)
    later_inf[0, 0] = float("inf")
    with pytest.raises(ValueError, match="features have infinite values"):
        profile_data(_loader(later_inf, torch.arange(5.0), 2))  # found in batch 1, remembered after it


def test_one_dimensional_features_are_one_feature_and_missing_targets_alone_are_reported():
    prof = profile_data(torch.randn(30), torch.randn(30))
    assert prof.facts.n_features == 1 and prof.evidence["n_features"] == "1 features per example"
    y = torch.randn(30)
    y[2] = float("nan")
    only_y = profile_data(torch.randn(30, 2), y)
    assert only_y.evidence["missing"].startswith("0 missing (NaN) feature values and 1 missing targets")


def test_the_fence_itself_is_not_beyond_it():
    """Values exactly at q1 - 3 IQR and q3 + 3 IQR are not outliers: the fence is [-8.75, 15.75] here."""
    y = torch.tensor([-8.75, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 15.75], dtype=torch.float64)
    prof = profile_data(torch.randn(8, 1), y)
    assert prof.facts.target_outlier_fraction == 0.0
    assert prof.evidence["target_outlier_fraction"] == ("0.00% of all targets lie beyond 3 IQR of the quartiles "
                                                        "[-8.75, 15.75]")
    beyond = profile_data(torch.randn(8, 1), torch.cat([y[:-1], torch.tensor([15.76], dtype=torch.float64)]))
    assert beyond.facts.target_outlier_fraction == 1 / 8


@pytest.mark.parametrize("y, scale", [
    ([1.5, 1.5, 1.5, 1.5, 1.5, 2.5, 3.5, 5.5], None),      # MAD 0: no robust scale to report
    ([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5], 1.4826),    # MAD 1.0
    ([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75], 0.7413),  # MAD 0.5: a scale under 1 is still a scale
])
def test_the_robust_scale_is_reported_when_positive(y, scale):
    prof = profile_data(torch.randn(8, 1), torch.tensor(y))
    assert prof.facts.task == "regression" and prof.facts.target_outlier_fraction is not None
    if scale is None:
        assert prof.facts.target_scale is None and "target_scale" not in prof.evidence
    else:
        assert prof.facts.target_scale == pytest.approx(scale)


def _reservoir_reference(values, size):
    """Vitter's algorithm R with random.Random(0), as profile_data documents it."""
    import random

    rng, out = random.Random(0), []
    for n, v in enumerate(values, start=1):
        if len(out) < size:
            out.append(v)
        else:
            j = rng.randrange(n)
            if j < size:
                out[j] = v
    return sorted(out)


def test_large_targets_are_summarized_from_a_documented_reservoir_sample():
    """Over 100,000 targets the robust statistics come from a uniform reservoir sample of 100,000 (algorithm
    R, seed 0): the facts equal those of that sample, exactly; at exactly 100,000 every target is used."""
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(130_000, generator=gen, dtype=torch.float64) ** 3
    prof = profile_data(torch.zeros(130_000, 1), y)
    sample = _reservoir_reference(y.tolist(), 100_000)
    q1, med, q3 = (data._quantile(sample, q) for q in (0.25, 0.5, 0.75))
    lo, hi = q1 - 3 * (q3 - q1), q3 + 3 * (q3 - q1)
    assert prof.facts.target_outlier_fraction == sum(1 for v in sample if v < lo or v > hi) / 100_000
    assert prof.facts.target_scale == 1.4826 * data._quantile(sorted(abs(v - med) for v in sample), 0.5)
    assert "of a uniform sample of 100,000 targets lie beyond" in prof.evidence["target_outlier_fraction"]
    exact = profile_data(torch.zeros(100_000, 1), y[:100_000])
    assert "of all targets lie beyond" in exact.evidence["target_outlier_fraction"]


def test_distinct_value_and_label_caps_are_1000():
    """Up to 1,000 distinct integer labels are classes (task given); 1,001 are refused as classes; the task
    inference counts 1,000 exactly and says 'more than 1,000' past it."""
    y = torch.arange(2000) % 1000
    prof = profile_data(torch.zeros(2000, 1), y, task="classification")
    assert len(prof.facts.class_counts) == 1000
    with pytest.raises(ValueError, match=r"^profile_data: task='classification' needs integer class labels in the "
                                         r"target$"):
        profile_data(torch.zeros(2002, 1), torch.arange(2002) % 1001, task="classification")
    thousand = profile_data(torch.zeros(2000, 1), y.double() + 0.5)
    assert thousand.evidence["task"] == "regression: the target has 1000 distinct real values: a quantity to predict"
    with pytest.raises(ValueError, match=r"^profile_data: the data is empty$"):
        profile_data(_loader(torch.zeros(0, 2), torch.zeros(0), 4))


def test_as_many_distinct_integers_as_examples_is_a_quantity():
    prof = profile_data(torch.zeros(20, 1), torch.arange(20))
    assert prof.facts.task == "regression"
    assert profile_data(torch.zeros(21, 1), torch.arange(21) % 20).facts.task == "classification"


@pytest.mark.parametrize("n_classes, shown", [(6, "(5->0, 6->1, 7->2, 8->3, 9->4, 10->5)"),
                                              (7, "(5->0, 6->1, 7->2, 8->3, 9->4, 10->5 ...)")])
def test_label_mappings_show_six(n_classes, shown):
    prof = profile_data(torch.zeros(10 * n_classes, 1), torch.arange(10 * n_classes) % n_classes + 5)
    assert f"smallest label {shown}; counts" in prof.evidence["class_labels"]


@pytest.mark.parametrize("counts, text", [
    ([8, 4, 2], "3 classes, counts [8, 4, 2]; largest/smallest = 4"),
    ([2] * 10, "10 classes, counts [2, 2, 2, 2, 2, 2, 2, 2, 2, 2]; largest/smallest = 1"),
    ([3] + [2] * 10, "11 classes, counts [3, 2, 2, 2, 2, 2, 2, 2, 2, 2] ...; largest/smallest = 1.5"),
])
def test_class_count_evidence_shows_ten(counts, text):
    y = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    assert profile_data(torch.zeros(len(y), 1), y).evidence["class_counts"] == text


def test_two_non_integer_values_are_a_quantity_not_a_refusal():
    """{0.1, 0.9} was refused with a message about task='classification', which the caller never passed:
    two distinct non-integer values are read as a quantity (and the evidence says how to make them classes);
    asked for classes, the refusal says what is wrong with them."""
    y = torch.tensor([0.1, 0.9] * 50)
    prof = profile_data(torch.randn(100, 3), y)
    assert prof.facts.task == "regression"
    assert prof.evidence["task"].startswith("regression: the target has exactly 2 distinct values, not integers")
    with pytest.raises(ValueError, match=r"^profile_data: task='classification' needs integer class labels in the "
                                         r"target \(it has non-integer values: encode the classes as 0, 1, ...\)$"):
        profile_data(torch.randn(100, 3), y, task="classification")
    assert profile_data(torch.randn(100, 3), (y > 0.5).long()).facts.task == "classification"
