"""Watch a training loop, diagnose its curves, and fold the diagnosis into the advice.

    python examples/watch_training.py
"""

import torch

from optadvisor import kernels
from optadvisor.advisor import TrainingMonitor, advise, lr_range_test

torch.manual_seed(0)
X, y = torch.randn(2000, 10), torch.randn(2000)
model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1), torch.nn.Flatten(0))
loss_fn = kernels.MSELoss()

sweep = lr_range_test(model, loss_fn, lambda p, lr: kernels.Adam(p, lr=lr), (X, y))
print("range test:", sweep.reasoning)

opt = kernels.Adam(model.parameters(), lr=1.0)   # deliberately far too high
monitor = TrainingMonitor()
for step in range(200):
    i = (step * 64) % 2000
    opt.zero_grad()
    loss = loss_fn(model(X[i:i + 64]), y[i:i + 64])
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    opt.step()
    monitor.log(step, train_loss=loss.item(), grad_norm=norm.item(), lr=opt.param_groups[0]["lr"])

print(advise(task="regression", n_samples=2000, model_kind="mlp", history=monitor).explain())
