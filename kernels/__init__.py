"""optadvisor's fused, from-scratch optimizers and losses: drop-ins for torch.optim and torch.nn.

>>> from optadvisor.kernels import Adam
>>> opt = Adam(model.parameters(), lr=1e-3)   # exactly torch.optim.Adam's signature and defaults

Each class registers itself in the catalog (``kernels.catalog``) as its module is imported; the import order
below is the catalog's order, which the advisor uses to break ties (Adam, AdamW, SGD, RMSprop, ...).
"""

from .optim.adam import Adam, AdamW  # noqa: I001 - the import order is the catalog's order
from .optim.sgd import SGD
from .optim.rmsprop import RMSprop
from .optim.adagrad import Adagrad, Adagrad8bit
from .optim.eightbit import Adam8bit, AdamW8bit, RMSprop8bit, SGD8bit
from .optim.lion import Lion, Lion8bit
from .optim.nadam import NAdam, NAdam8bit
from .optim.radam import RAdam, RAdam8bit
from .optim.schedulefree import ScheduleFreeAdamW
from .optim.muon import Muon
from .optim.adafactor import Adafactor
from .optim.hybrid import MuonWithAdamW, muon_with_adamw, split_for_muon
AdamWScheduleFree = ScheduleFreeAdamW  # the schedulefree package's name for it: a drop-in import
from .precision.blockwise import dequantize_state_dict
from .losses.regression import HuberLoss, MSELoss, huber_loss, mse_loss
from .losses.cross_entropy import CrossEntropyLoss, cross_entropy
from .losses.linear_cross_entropy import LinearCrossEntropyLoss, linear_cross_entropy
from .losses.margin import HingeLoss, MultiMarginLoss, hinge_loss, multi_margin_loss
from . import _catalog as catalog
from ._runtime.compile import ENV_VAR as COMPILE_ENV_VAR
from ._runtime.warmup import warmup
from ._factory import create_optimizer, list_optimizers, param_groups

__all__ = [
                      "COMPILE_ENV_VAR",
                      "SGD",
                      "SGD8bit",
                      "ScheduleFreeAdamW",
                      "Adafactor",
                      "Adagrad",
                      "Adagrad8bit",
                      "Adam",
                      "Adam8bit",
                      "AdamW",
                      "AdamW8bit",
                      "AdamWScheduleFree",
                      "CrossEntropyLoss",
                      "HingeLoss",
                      "HuberLoss",
                      "Lion",
                      "Lion8bit",
                      "LinearCrossEntropyLoss",
                      "MSELoss",
                      "MultiMarginLoss",
                      "Muon",
                      "MuonWithAdamW",
                      "NAdam",
                      "NAdam8bit",
                      "RAdam",
                      "RAdam8bit",
                      "RMSprop",
                      "RMSprop8bit",
                      "catalog",
                      "create_optimizer",
                      "cross_entropy",
                      "dequantize_state_dict",
                      "hinge_loss",
                      "huber_loss",
                      "linear_cross_entropy",
                      "list_optimizers",
                      "mse_loss",
                      "muon_with_adamw",
                      "multi_margin_loss",
                      "param_groups",
                      "split_for_muon",
                      "warmup",
]
