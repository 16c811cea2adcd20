"""optadvisor's fused, from-scratch optimizers and losses: drop-ins for torch.optim and torch.nn.

>>> from kernels import Adam
>>> opt = Adam(model.parameters(), lr=1e-3)   # exactly torch.optim.Adam's signature and defaults
"""

from ._adam import Adam, AdamW
from ._compile import ENV_VAR as COMPILE_ENV_VAR
from ._losses import (
                      CrossEntropyLoss,
                      HingeLoss,
                      HuberLoss,
                      LinearCrossEntropyLoss,
                      MSELoss,
                      MultiMarginLoss,
                      cross_entropy,
                      hinge_loss,
                      huber_loss,
                      linear_cross_entropy,
                      mse_loss,
                      multi_margin_loss,
)
from ._rmsprop import RMSprop
from ._sgd import SGD

__all__ = [
                      "COMPILE_ENV_VAR",
                      "SGD",
                      "Adam",
                      "AdamW",
                      "CrossEntropyLoss",
                      "HingeLoss",
                      "HuberLoss",
                      "LinearCrossEntropyLoss",
                      "MSELoss",
                      "MultiMarginLoss",
                      "RMSprop",
                      "cross_entropy",
                      "hinge_loss",
                      "huber_loss",
                      "linear_cross_entropy",
                      "mse_loss",
                      "multi_margin_loss",
]
