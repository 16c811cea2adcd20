"""TaskProfile: the facts about a task that rules reason over. Missing facts are unknown, not false."""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ._expr import BOOL, NUMBER, NUMBERS, STR


_FROM_HISTORY = {"from_history": True}


class TaskProfile(BaseModel):
    """What is known about a training task. Every field but ``task`` may be left unknown (None).

    Example::

        >>> TaskProfile(task="classification", n_samples=50_000, n_classes=10, class_imbalance=20)
    """

    # a fact of inf would pass every >= bound and turn into advice such as HuberLoss(delta=inf)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    task: Literal["regression", "classification"] = Field(
        description="What is predicted: a real value (regression) or a class (classification).")
    n_samples: int | None = Field(None, ge=1, description="Number of training examples.")
    n_features: int | None = Field(None, ge=1, description="Number of input features per example.")
    feature_sparsity: float | None = Field(
        None, ge=0.0, le=1.0, description="Fraction of the input feature values that are exactly zero (missing "
                                          "values left out): one-hot, bag-of-words and click-log data are >0.9.")
    n_classes: int | None = Field(None, ge=2, description="Number of classes (classification).")
    class_counts: list[int] | None = Field(
        None, min_length=2, description="Training examples per class; gives n_classes and class_imbalance.")
    class_imbalance: float | None = Field(
        None, ge=1.0, description="Ratio of the largest class's count to the smallest's (1 = balanced).")
    target_outlier_fraction: float | None = Field(
        None, ge=0.0, le=1.0, description="Fraction of regression targets that are outliers (e.g. beyond "
                                          "3 IQR of the quartiles, as profile_data counts them).")
    target_scale: float | None = Field(
        None, gt=0.0, description="Robust scale of the regression targets (1.4826 x median absolute "
                                  "deviation): sets Huber's delta.")
    label_noise: float | None = Field(None, ge=0.0, le=1.0,
                                      description="Estimated fraction of wrong labels.")
    model_kind: Literal["linear", "mlp", "cnn", "rnn", "transformer", "other"] | None = Field(
        None, description="The model family.")
    pretrained: bool = Field(
        False, description="The model starts from pretrained weights (fine-tuning); False: trained from scratch.")
    n_params: int | None = Field(None, ge=1, description="Number of trainable parameters.")
    memory_gb: float | None = Field(
        None, gt=0.0, description="Memory free for training where the model lives, in GiB (profile_data reads "
                                  "it: a CUDA device's free memory, or the host's available memory).")
    batch_size: int | None = Field(None, ge=1, description="Training batch size.")
    budget_steps: int | None = Field(None, ge=1, description="How many optimizer steps the training will run "
                                     "(the budget; with batch_size and n_samples it gives the epochs).")
    nonstationary: bool | None = Field(
        None, description="The data distribution shifts during training (online learning, RL, drift).")
    needs_probabilities: bool | None = Field(
        None, description="Calibrated class probabilities are wanted (False: only the decision/margin).")
    tuning_budget: int | None = Field(None, ge=1, description="Number of training runs the user can afford.")
    goal: Literal["fast_convergence", "best_generalization"] | None = Field(
        None, description="What matters most: reaching a good loss quickly, or the best held-out result.")
    teacher_for_distillation: bool | None = Field(
        None, description="The model will serve as a teacher for knowledge distillation.")

    # facts read off training curves by advisor.diagnose (advise(..., history=...) fills them in)
    diverged: bool | None = Field(None, description="Training loss became non-finite or blew up (from curves).",
                                  json_schema_extra=_FROM_HISTORY)
    exploding_gradients: bool | None = Field(None, description="Gradient norm spiked or became non-finite.",
                                             json_schema_extra=_FROM_HISTORY)
    plateau: bool | None = Field(None, description="Training loss stopped improving.",
                                 json_schema_extra=_FROM_HISTORY)
    noisy_loss: bool | None = Field(None, description="Training loss scatters widely around its trend.",
                                    json_schema_extra=_FROM_HISTORY)
    overfitting: bool | None = Field(None, description="Validation loss rises while training loss falls.",
                                     json_schema_extra=_FROM_HISTORY)
    loss_rising: bool | None = Field(None, description="Training loss trends upward.",
                                     json_schema_extra=_FROM_HISTORY)
    lr_too_low: bool | None = Field(None, description="Loss falls steadily but very slowly.",
                                    json_schema_extra=_FROM_HISTORY)
    grad_norm_p90: float | None = Field(None, ge=0.0, description="90th percentile of the logged gradient norms.",
                                        json_schema_extra=_FROM_HISTORY)
    last_lr: float | None = Field(None, gt=0.0, description="The learning rate at the end of the logged history.",
                                  json_schema_extra=_FROM_HISTORY)

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        counts = data.get("class_counts")
        if isinstance(counts, (list, tuple)) and len(counts) >= 2 and all(
                isinstance(c, int) and not isinstance(c, bool) for c in counts):
            if any(c < 0 for c in counts):
                raise ValueError("class_counts must be >= 0")
            if data.get("n_classes") is None:
                data["n_classes"] = len(counts)
            elif data["n_classes"] != len(counts):
                raise ValueError(f"n_classes={data['n_classes']} but class_counts has {len(counts)} entries")
            if data.get("class_imbalance") is None and min(counts) > 0:
                data["class_imbalance"] = max(counts) / min(counts)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TaskProfile:
        if self.task == "regression":
            for name in ("n_classes", "class_counts", "class_imbalance"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is a classification fact; task is 'regression'")
        return self

    def known(self) -> dict[str, Any]:
        """The facts that are known (not None), less those left at a default that is not None (``pretrained``:
        False unless said)."""
        fields = type(self).model_fields
        return {k: v for k, v in self.model_dump().items()
                if v is not None and (fields[k].default is None or fields[k].is_required() or v != fields[k].default)}


def fact_types() -> dict[str, str]:
    """Each fact's type in the rule language, read off the TaskProfile fields."""
    types = {}
    for name, field in TaskProfile.model_fields.items():
        ann = field.annotation
        if get_origin(ann) is Literal:
            base = ann
        else:
            base = next((a for a in get_args(ann) if a is not type(None)), ann)
        if get_origin(base) is Literal:
            types[name] = STR
        elif base is bool:
            types[name] = BOOL
        elif base in (int, float):
            types[name] = NUMBER
        elif get_origin(base) is list:
            types[name] = NUMBERS
        else:  # pragma: no cover - a new field type must be mapped here
            raise TypeError(f"fact {name} has an unsupported type {ann}")
    return types


FACT_TYPES = fact_types()


HISTORY_FACTS = frozenset(name for name, f in TaskProfile.model_fields.items()
                          if (f.json_schema_extra or {}).get("from_history"))
