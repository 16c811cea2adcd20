"""kernels' catalog: one table of optimizers and losses, read by the advisor, the tests and the benchmarks."""

import dataclasses
import inspect
import warnings

import pytest
import torch
from strategies import UNDER_MUTMUT

from optadvisor import kernels
from optadvisor.advisor import advise
from optadvisor.advisor._engine import Choice, build_loss, build_optimizer
from optadvisor.advisor._rules import LOSSES_FOR_TASK, OPTIMIZERS, PARAMS
from optadvisor.kernels import catalog


# the references whose class is named otherwise: ours is also importable under the reference's name
_REFERENCE_NAMES = {"ScheduleFreeAdamW": "AdamWScheduleFree"}


def test_reference_names_are_aliases():
    assert kernels.AdamWScheduleFree is kernels.ScheduleFreeAdamW
    assert "AdamWScheduleFree" in kernels.__all__


def test_order_is_the_advisors_tie_break_order():
    """The import order in kernels/__init__.py is the catalog's order; the advisor breaks ties by it (Adam
    first): reordering those imports would change advice, so it is pinned here."""
    assert [e.name for e in catalog.optimizers()] == ["Adam", "AdamW", "SGD", "RMSprop", "Adagrad",
                                                         "Adagrad8bit", "Adam8bit", "AdamW8bit", "SGD8bit",
                                                         "RMSprop8bit", "Lion", "Lion8bit", "NAdam",
                                                         "NAdam8bit", "RAdam", "RAdam8bit", "ScheduleFreeAdamW", "Muon",
                                                         "Adafactor"]
    assert OPTIMIZERS == ("Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adagrad8bit", "Adam8bit", "AdamW8bit",
                          "SGD8bit", "RMSprop8bit", "Lion", "Lion8bit", "NAdam", "NAdam8bit", "RAdam", "RAdam8bit",
                          "ScheduleFreeAdamW", "Muon", "Adafactor")
    assert LOSSES_FOR_TASK == {"regression": ("MSELoss", "HuberLoss"),
                               "classification": ("CrossEntropyLoss", "MultiMarginLoss", "HingeLoss")}


@pytest.mark.parametrize("entry", [*catalog.optimizers(), *catalog.losses()], ids=lambda e: e.name)
def test_hyperparameters_are_the_signature(entry):
    """Every constructor argument but the implementation selectors is a hyperparameter, with its default;
    the rule language accepts exactly those for a candidate."""
    sig = inspect.signature(entry.cls.__init__).parameters
    skip = {"self", "params", "foreach", "capturable", "differentiable", "fused", "maximize", "size_average",
            "reduce", "reduction", "decoupled_weight_decay", "state_dtype", "kahan_sum"}
    assert list(entry.params) == [n for n in sig if n not in skip]
    for name, hp in entry.params.items():
        default = sig[name].default
        assert hp.default == (None if default is inspect.Parameter.empty else default)
        assert hp.type in ("number", "list[number]", "bool") or (
            name == "state" and hp.type in ("choice:param|bf16|8bit", "choice:param", "choice:8bit")  # the codecs
            or (name, hp.type) == ("adjust_lr_fn", "choice:original|match_rms_adamw"))  # Muon's words
    if entry.tasks or entry.kind == "optimizer":
        assert PARAMS[entry.name] == {n: p.type for n, p in entry.params.items()}
    assert getattr(kernels, entry.name) is entry.cls
    if entry.torch is not None:  # the 8-bit optimizers' counterpart: the same update with float state
        assert entry.torch_class().__name__ == _REFERENCE_NAMES.get(entry.name, entry.name.removesuffix("8bit"))


def test_types_read_off_annotations():
    adam = catalog.entry("Adam").params
    assert (adam["lr"].type, adam["betas"].type, adam["amsgrad"].type) == ("number", "list[number]", "bool")
    ce = catalog.entry("CrossEntropyLoss").params
    assert ce["weight"].type == "list[number]" and ce["ignore_index"].type == "number"
    # rule-language values become what the constructor takes
    assert ce["weight"].coerce([1, 2]).dtype == torch.float32
    assert ce["ignore_index"].coerce(3.0) == 3 and isinstance(ce["ignore_index"].coerce(3.0), int)
    assert adam["betas"].coerce([0.9, 0.99]) == (0.9, 0.99)
    assert adam["lr"].coerce(1.0) == 1.0 and isinstance(adam["lr"].coerce(1.0), float)


def test_bad_registrations_are_refused_by_name():
    with pytest.raises(ValueError, match="kind must be 'optimizer' or 'loss'"):
        catalog.register("scheduler", torch=None)

    class Odd(torch.nn.Module):
        def __init__(self, mode: str = "x") -> None:
            super().__init__()
    with pytest.raises(TypeError, match=r"Odd.__init__ argument 'mode' has annotation"):
        catalog.register("loss", torch=None)(Odd)
    assert "Odd" not in [e.name for e in catalog.losses()]

    class MSELoss(torch.nn.Module):  # another class under a registered name
        pass
    with pytest.raises(ValueError, match="MSELoss is registered twice"):
        catalog.register("loss", torch=None)(MSELoss)
    assert catalog.entry("MSELoss").cls is kernels.MSELoss
    with pytest.raises(KeyError, match="'Shampoo' is not in optadvisor's catalog; known: Adam, AdamW"):
        catalog.entry("Shampoo")


def test_registering_again_now_gives_the_import_times_catalog(monkeypatch):
    """register(), hyperparameters() and the listings run at import; here they run again inside the test on
    every catalog class (mutation testing sees only what runs in a test), and must rebuild the same table."""
    from optadvisor.kernels import _catalog
    before = list(_catalog._ENTRIES.values())
    monkeypatch.setattr(_catalog, "_ENTRIES", {})
    for e in before:
        catalog.register(e.kind, torch=e.torch, functional=e.functional, tasks=list(e.tasks),
                         default_candidate=e.default_candidate, trial_note=e.trial_note,
                         configs={c.name: (c.kwargs, c.bytes_per_element) for c in e.configs})(e.cls)
    assert list(_catalog._ENTRIES.values()) == before
    for e in before:  # the same class again: kept under its name, with the new arguments, not refused
        catalog.register(e.kind, torch=e.torch)(e.cls)
    assert list(_catalog._ENTRIES.values()) == [
        dataclasses.replace(e, functional=None, tasks=(), default_candidate=True, trial_note=None, configs=())
        for e in before]
    monkeypatch.setattr(_catalog, "_ENTRIES", {e.name: e for e in before})
    assert [e.name for e in catalog.losses("regression")] == ["MSELoss", "HuberLoss"]
    assert [e.name for e in catalog.losses("classification")] == ["CrossEntropyLoss", "MultiMarginLoss", "HingeLoss"]
    assert catalog.losses("ranking") == () and len(catalog.losses()) == 6
    assert catalog.tasks() == ("regression", "classification")
    for e in before:
        assert catalog.hyperparameters(e.cls) == e.params
        assert catalog.entry(e.name) is e


def test_every_kind_of_annotation_maps_to_its_rule_type():
    class Every(torch.nn.Module):
        def __init__(self, params, req: float, a: float = 1.0, b: int = 2, c: bool = False, d: float | torch.Tensor = 1e-3,
                     e: tuple[float, float] = (0.9, 0.99), f: "list[float] | None" = None,
                     g: "torch.Tensor | None" = None, h: int | None = None, i=0.5, flag: bool | None = None,
                     *args, reduction: str = "mean", foreach: bool | None = None, **kwargs) -> None:
            super().__init__()
    got = {n: (hp.type, hp.default, set(hp.accepts)) for n, hp in catalog.hyperparameters(Every).items()}
    assert got == {"req": ("number", None, {float}), "a": ("number", 1.0, {float}), "b": ("number", 2, {int}), "c": ("bool", False, {bool}),
                   "d": ("number", 1e-3, {float, torch.Tensor}), "e": ("list[number]", (0.9, 0.99), {tuple}),
                   "f": ("list[number]", None, {list, type(None)}), "g": ("list[number]", None, {torch.Tensor, type(None)}),
                   "h": ("number", None, {int, type(None)}), "i": ("number", 0.5, {float}),
                   "flag": ("bool", None, {bool, type(None)})}
    with pytest.raises(TypeError, match=r"^catalog: Odd.__init__ argument 'mode' has annotation <class 'str'>, "
                                        r"which maps to no rule-language type \(number, numbers, bool\)$"):
        class Odd:
            def __init__(self, mode: str = "x"):
                pass
        catalog.hyperparameters(Odd)


@pytest.mark.parametrize("entry", catalog.optimizers(), ids=lambda e: e.name)
def test_build_optimizer_for_every_catalog_optimizer(entry):
    p = torch.nn.Parameter(torch.randn(3, 2) if entry.name == "Muon" else torch.randn(3))  # Muon: matrices only
    opt = build_optimizer(Choice(name=entry.name, params={"lr": 0.01}, score=0.0), [p])
    assert type(opt) is entry.cls and opt.param_groups[0]["lr"] == 0.01
    with pytest.raises(ValueError, match=f"{entry.name} is an optimizer, not a loss"):
        build_loss(Choice(name=entry.name, params={}, score=0.0))


def test_build_loss_coerces_rule_values():
    loss = build_loss(Choice(name="CrossEntropyLoss", params={"weight": [1.0, 2.0], "ignore_index": 1.0},
                             score=0.0))
    assert isinstance(loss, kernels.CrossEntropyLoss) and loss.ignore_index == 1
    assert torch.equal(loss.weight, torch.tensor([1.0, 2.0]))
    assert build_loss(Choice(name="MultiMarginLoss", params={"p": 2.0}, score=0.0)).p == 2


def test_recommendation_keeps_optimizers_and_losses_apart():
    rec = advise(task="classification", n_samples=500)
    assert list(rec.optimizers) == list(OPTIMIZERS)
    assert list(rec.losses) == list(LOSSES_FOR_TASK["classification"])
    assert rec.optimizer is rec.optimizers[rec.optimizer.name] and rec.loss is rec.losses[rec.loss.name]
    assert rec.candidates == {**rec.optimizers, **rec.losses}
    dumped = rec.model_dump()
    assert set(dumped["optimizers"]) == set(OPTIMIZERS) and "candidates" not in dumped


def test_adagrad_is_advised_for_sparse_features_only():
    sparse = advise(task="classification", n_samples=5000, feature_sparsity=0.97)
    assert sparse.optimizer.name == "Adagrad"
    assert any(r.rule_id == "adagrad-sparse-features" for r in sparse.reasons)
    dense = advise(task="classification", n_samples=5000, feature_sparsity=0.1)
    assert dense.optimizer.name == "Adam" and dense.optimizers["Adagrad"].score == 0


def test_a_recommendation_saved_with_one_candidates_dict_still_loads():
    """Before optimizers and losses were kept apart, a Recommendation serialized one ``candidates`` dict:
    such a file loads, each candidate where the catalog puts it; an unknown name is refused by name."""
    from optadvisor.advisor import Recommendation

    rec = advise(task="regression", n_samples=300)
    old = rec.model_dump(mode="json")
    old["candidates"] = {**old.pop("optimizers"), **old.pop("losses")}
    back = Recommendation.model_validate(old)
    assert back.optimizers == rec.optimizers and back.losses == rec.losses
    old["candidates"]["Shampoo"] = {"name": "Shampoo", "params": {}, "score": 0.0}
    with pytest.raises(ValueError, match="candidates: 'Shampoo' is not in optadvisor's catalog"):
        Recommendation.model_validate(old)


# a valid value other than torch's default for every argument torch's optimizers take (the implementation
# selectors separately: torch refuses foreach and fused together)
_NON_DEFAULT = dict(lr=0.0123, betas=(0.85, 0.95), eps=1e-6, weight_decay=0.03, amsgrad=True, momentum=0.7,
                    dampening=0.2, alpha=0.9, centered=True, maximize=True, decoupled_weight_decay=True,
                    lr_decay=0.01, initial_accumulator_value=0.1)
_REFUSED_BY_8BIT = ("amsgrad", "centered")  # refused with a message of their own (test_quantized*)


@pytest.mark.parametrize("entry", catalog.optimizers(), ids=lambda e: e.name)
@pytest.mark.parametrize("variant", ["defaults", "foreach=False", "fused=True", "nesterov"])
def test_arguments_and_param_groups_are_torchs(entry, variant):
    """A drop-in's constructor: every argument torch's takes, of the same kind and with torch's default; and
    the param_groups it builds hold torch's keys in torch's order with the values torch stores, given the
    defaults or a non-default value for every argument. Ours add only their own keys (after torch's).
    ``fused`` selects our implementation and stays None in the group, so that torch.optim loading our
    checkpoint picks its own path."""
    ours_cls, torch_cls = entry.cls, entry.torch_class()
    sig, torch_sig = (inspect.signature(c.__init__).parameters for c in (ours_cls, torch_cls))
    for name, param in torch_sig.items():
        assert name in sig, f"{entry.name} lacks torch's argument {name!r}"
        assert (sig[name].kind, sig[name].default) == (param.kind, param.default), name
    kw = {}
    if variant != "defaults":
        kw = {k: v for k, v in _NON_DEFAULT.items() if k in torch_sig}
        if entry.name.endswith("8bit"):
            kw = {k: v for k, v in kw.items() if k not in _REFUSED_BY_8BIT}
        if entry.name == "Adafactor":  # its eps is a pair (epsilon1, epsilon2)
            kw.update(eps=(1e-30, 1e-4), beta2_decay=-0.5, d=2.0)
        if variant == "foreach=False" and "foreach" in torch_sig:  # (lion-pytorch's Lion has none)
            kw["foreach"] = False
        elif variant == "fused=True" and "fused" in torch_sig:
            kw["fused"] = True
        elif variant == "nesterov" and "nesterov" in torch_sig:
            kw.update(nesterov=True, **({"dampening": 0} if "dampening" in torch_sig else {}))
    shape = (2, 2) if entry.name == "Muon" else (2,)  # Muon: matrices only
    ours = ours_cls([torch.nn.Parameter(torch.ones(shape))], **kw)
    ref = torch_cls([torch.nn.Parameter(torch.ones(shape))], **kw)
    group, ref_group = ({k: v for k, v in g.param_groups[0].items() if k != "params"} for g in (ours, ref))
    if kw.get("fused"):
        assert group.pop("fused") is None
        ref_group.pop("fused")
    assert list(group)[:len(ref_group)] == list(ref_group)
    assert {k: group[k] for k in ref_group} == ref_group
    own = {"block_size": 256, "min_8bit_size": 4096} if entry.name.endswith("8bit") else {}
    assert {k: group[k] for k in list(group)[len(ref_group):]} == own


_LEGACY = [None, True, False]


@pytest.mark.parametrize("entry", [e for e in catalog.losses() if e.torch is not None], ids=lambda e: e.name)
def test_loss_arguments_and_attributes_are_torchs(entry):
    """A drop-in loss module: torch's arguments (kind and default); the legacy ``size_average``/``reduce``
    pairs resolve to the ``reduction`` torch's resolves them to; and each reduction gives torch's value."""
    ours_cls, torch_cls = entry.cls, entry.torch_class()
    sig, torch_sig = (inspect.signature(c.__init__).parameters for c in (ours_cls, torch_cls))
    assert [(n, p.kind, p.default) for n, p in sig.items()] == [(n, p.kind, p.default) for n, p in
                                                                 torch_sig.items()]
    built, ref_built = ours_cls(), torch_cls()  # no arguments: what each default became
    for name in torch_sig:
        if name not in ("self", "size_average", "reduce") and hasattr(ref_built, name):
            assert getattr(built, name) == getattr(ref_built, name), name
    if "reduce" in torch_sig:
        for size_average in _LEGACY:
            for reduce in _LEGACY:
                kw = dict(size_average=size_average, reduce=reduce)
                with warnings.catch_warnings(record=True) as ours_said:
                    warnings.simplefilter("always")
                    ours = ours_cls(**kw)
                with warnings.catch_warnings(record=True) as torch_said:
                    warnings.simplefilter("always")
                    ref = torch_cls(**kw)
                assert ours.reduction == ref.reduction, kw
                # torch's deprecation warning, word for word, pointing at the caller's line (this file)
                assert [(w.category, str(w.message)) for w in ours_said] == \
                    [(w.category, str(w.message)) for w in torch_said], kw
                if not UNDER_MUTMUT:
                    assert all(w.filename == __file__ for w in ours_said), kw
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = (torch.randint(0, 4, (6,), generator=gen) if entry.name in ("CrossEntropyLoss", "MultiMarginLoss")
         else torch.randn(6, 4, generator=gen, dtype=torch.float64))
    extra = {"HuberLoss": dict(delta=0.3)}.get(entry.name, {})
    for reduction in ("mean", "sum", "none"):
        ours, ref = ours_cls(reduction=reduction, **extra), torch_cls(reduction=reduction, **extra)
        assert ours.reduction == reduction
        torch.testing.assert_close(ours(x, y), ref(x, y), rtol=1e-12, atol=1e-12)
