"""A trial worker in a process of its own, for the multi-worker, kill and takeover tests.

    python tests/trial_worker.py STORAGE [--barrier DIR N] [--die-at K] [--remote] [--grace S]

Runs the small iris study of the tests and prints the result as one JSON line. ``--barrier DIR N``: wait
until N workers have started (so they really run together); ``--die-at K``: the process exits (as if killed)
inside its K-th model construction; ``--remote``: this process believes no other worker's process is on its
host, so it can take over a dead worker's runs only through Optuna's heartbeat (after ``--grace`` seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

SMALL = {"budget_steps": 90, "n_trials": 14, "seeds": (0, 1, 2), "top_k": 2, "lr_steps": 30}


def small_study():
    from optadvisor.advisor import advise, profile_data
    from optadvisor.advisor._examples import example_task

    model_fn, train, val = example_task("iris")
    return model_fn, train, val, advise(profile_data(*train, model=model_fn()))


def summary(res) -> dict:
    return {"ranked": [[c.optimizer.name, c.loss.name, c.lr, c.weight_decay, c.best_step, c.mean, c.values]
                       for c in res.ranked],
            "winner": [res.winner.optimizer.name, res.winner.lr], "study": res.study_name,
            "steps_run": res.steps_run, "steps_total": res.steps_total, "train_steps":
            res.recommendation.train_steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("storage")
    ap.add_argument("--barrier", nargs=2)
    ap.add_argument("--die-at", type=int)
    ap.add_argument("--remote", action="store_true")
    ap.add_argument("--grace", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from optadvisor.advisor import _trial_study, trial

    model_fn, train, val, rec = small_study()
    if args.remote:
        _trial_study._pid_dead = lambda worker: False
    calls = [0]

    def dying_model_fn():
        calls[0] += 1
        if args.die_at is not None and calls[0] == args.die_at:
            os._exit(9)
        return model_fn()
    if args.barrier:
        folder, n = args.barrier[0], int(args.barrier[1])
        open(os.path.join(folder, f"ready-{os.getpid()}"), "w").close()
        while len(os.listdir(folder)) < n:
            time.sleep(0.01)
    res = trial(dying_model_fn, train, val, rec, storage=args.storage, progress=False, poll_seconds=0.05,
                heartbeat_interval=1, grace_period=args.grace, **SMALL)
    print(json.dumps(summary(res)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
