"""Profile scikit-learn's digits, get advice, confirm it with a trial, and train with the winner.

    pip install '.[trial]' scikit-learn matplotlib && python examples/trial_digits.py [OUTPUT_DIR]

Writes the study (digits-trials.db: a rerun reuses its finished runs) and the curves (digits-curves.png) to
OUTPUT_DIR, by default a folder of the system's temporary directory (printed), never the working tree.
"""

import os
import sys
import tempfile

import torch

from optadvisor.advisor import advise, profile_data, trial
from optadvisor.advisor._examples import example_task

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(tempfile.gettempdir(), "optadvisor-digits")
os.makedirs(out, exist_ok=True)
print("output:", out)
model_fn, (X_train, y_train), (X_val, y_val) = example_task("digits")
profile = profile_data(X_train, y_train, model=model_fn())
print(profile.explain(), "\n")
rec = advise(profile)
print(rec.explain(), "\n")

result = trial(model_fn, (X_train, y_train), (X_val, y_val), rec,
               storage=os.path.join(out, "digits-trials.db"))   # rerun: finished runs are reused
print(result.table())
result.plot(os.path.join(out, "digits-curves.png"))

final = result.recommendation                   # the advice, with the measured evidence as its first reason
model = model_fn()
opt, loss_fn = final.build_optimizer(model.parameters()), final.build_loss()
for step in range(final.train_steps):          # early stopping: as long as the trial found best
    i = (step * 64) % len(y_train)
    opt.zero_grad()
    loss_fn(model(X_train[i:i + 64]), y_train[i:i + 64]).backward()
    opt.step()
with torch.no_grad():
    print("validation accuracy:", (model(X_val).argmax(1) == y_val).float().mean().item())
