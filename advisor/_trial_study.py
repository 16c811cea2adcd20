"""The trial's Optuna study, shared by workers: storage, the plan kept in the study, claims, heartbeats,
taking over a dead worker's runs, waiting for runs in flight."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_WORKER = f"{socket.gethostname()}:{os.getpid()}"


def _open_storage(storage: str | None, heartbeat_interval: int, grace_period: int):
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("advisor.trial needs optuna: pip install 'optadvisor[trial]'") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or "optadvisor-trials.db"
    if "://" not in url:
        url = f"sqlite:///{Path(url).resolve()}"
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        _sqlite_wal(url[len("sqlite:///"):])
    for attempt in range(6):
        try:
            rdb = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_interval,
                                             grace_period=grace_period)
            return optuna, rdb, url
        except Exception as exc:  # sqlalchemy/optuna raise many types for a bad or unreachable URL
            text = str(exc)
            # workers started together on a new database race to create its tables: the loser retries
            if attempt < 5 and any(k in text for k in _SCHEMA_RACE):
                time.sleep(0.2 * (attempt + 1))
                continue
            raise ValueError(f"trial: cannot open the Optuna storage {url!r}: {type(exc).__name__}: "
                             f"{text.splitlines()[0] if text else ''}") from None
    raise AssertionError("unreachable")


def _sqlite_wal(path: str) -> None:
    """Write-ahead logging for an SQLite study file (a setting stored in the file): readers no longer block
    the writer, which is what several workers on one machine need, and each commit costs less."""
    import sqlite3

    # Changing the journal mode needs the file to itself, and SQLite answers "database is locked" at once
    # (without its busy timeout) while another worker starting beside this one holds it: retry for ~30 s.
    for attempt in range(60):
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(path, timeout=60)
            try:
                con.execute("PRAGMA journal_mode=WAL")
            finally:
                con.close()
            return
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) and attempt < 59:
                time.sleep(min(0.05 * (attempt + 1), 1.0))
                continue
            raise ValueError(f"trial: cannot open the SQLite study file {path!r}: {exc}") from None
        except sqlite3.Error as exc:
            raise ValueError(f"trial: cannot open the SQLite study file {path!r}: {exc}") from None


_SCHEMA_RACE = ("already exists", "duplicate key", "UniqueViolation", "UNIQUE constraint", "database is locked")


class _Heartbeat:
    """Record a run's heartbeat every ``interval`` seconds while it trains (Optuna fails stale runs)."""

    def __init__(self, rdb: Any, trial_id: int, interval: float):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(rdb, trial_id, interval), daemon=True)
        rdb.record_heartbeat(trial_id)
        self._thread.start()

    def _beat(self, rdb, trial_id, interval):
        while not self._stop.wait(interval):
            try:
                rdb.record_heartbeat(trial_id)
            except Exception:  # noqa: BLE001 - a missed beat only risks a takeover; the run goes on
                pass

    def stop(self):
        self._stop.set()
        self._thread.join()


def _pid_dead(worker: str) -> bool:
    """A worker id of this host whose process no longer exists (killed: its runs can be taken over now)."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class _Study:
    """How ``_Search`` coordinates with other workers through the study."""

    # ---- study and plan ------------------------------------------------------------------------------
    def _open_study(self):
        optuna = self.optuna
        try:
            self.study = optuna.create_study(study_name=self.name, storage=self.rdb, direction="minimize")
            creator = True
        except optuna.exceptions.DuplicatedStudyError:
            self.study = optuna.load_study(study_name=self.name, storage=self.rdb)
            creator = False
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"trial: cannot open the Optuna storage {self.url!r}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        # Optuna's caching wrapper of the RDB storage (finished runs are read once): every run is written and
        # read through it, with the storage API (one insert to start a run, two writes to end it)
        self.storage = self.study._storage
        attrs = self.study.user_attrs
        if creator:
            self.study.set_user_attr("fingerprint", self.fingerprint)
            self.study.set_user_attr("creator", _WORKER)
        elif attrs.get("fingerprint", self.fingerprint) != self.fingerprint:
            raise ValueError(f"trial: the study {self.name!r} in {self.url} was run with other data, another model "
                             "or other settings (its fingerprint differs); its results do not apply here. Use "
                             "another study_name, or leave it unset to get one derived from the fingerprint")
        self.plan = self._wait_for_plan(creator)

    def _wait_for_plan(self, creator: bool) -> list[dict[str, Any]]:
        start = time.monotonic()
        while not creator:
            attrs = self.study.user_attrs
            if "plan" in attrs:
                self.centres = attrs["centres"]
                return attrs["plan"]
            if time.monotonic() - start > self.grace or _pid_dead(str(attrs.get("creator", ""))):
                break  # the worker that created the study died before writing its plan: write it ourselves
            time.sleep(self.poll)
        plan = self._make_plan()
        self.study.set_user_attr("centres", self.centres)
        self.study.set_user_attr("plan", plan)
        return plan

    # ---- slots -----------------------------------------------------------------------------------------
    def _trials_by_slot(self) -> dict[int, list[Any]]:
        out: dict[int, list[Any]] = {}
        for t in self.study.get_trials(deepcopy=False):
            if "run" in t.user_attrs:
                out.setdefault(int(t.user_attrs["run"]["slot"]), []).append(t)
        for slot, ts in out.items():
            ts.sort(key=lambda t: t.user_attrs["run"]["attempt"])
            if slot not in self._final and self._status(ts) == "done":
                self._final[slot] = ts[-1]
        return out

    def _status(self, attempts: list[Any]) -> str:
        """'free' (never run, or its last attempt was abandoned), 'running' or 'done'."""
        TS = self.optuna.trial.TrialState
        if not attempts:
            return "free"
        t = attempts[-1]
        if t.state in (TS.COMPLETE, TS.PRUNED) or (t.state == TS.FAIL and "diverged" in _outcome(t)):
            return "done"
        if t.state == TS.RUNNING:
            if _pid_dead(str(t.user_attrs["run"]["worker"])):
                try:
                    self.storage.set_trial_state_values(t._trial_id, state=TS.FAIL)
                except self.optuna.exceptions.UpdateFinishedTrialError:
                    pass
                return "free"
            return "running"
        return "free"  # FAIL (abandoned: its worker died) or WAITING

    def _claim(self, slot: int, attempt: int) -> bool:
        """Atomically claim (slot, attempt): the storage refuses a second study of the same name."""
        try:
            self.rdb.create_new_study([self.optuna.study.StudyDirection.MINIMIZE],
                                      f"{self.name}/claim/{slot}/{attempt}")
            return True
        except self.optuna.exceptions.DuplicatedStudyError:
            return False

    def _take(self, slot: int, by_slot: dict[int, list[Any]] | None = None) -> None:
        """Run ``slot`` here if nobody has it (or its worker is gone)."""
        by_slot = self._trials_by_slot() if by_slot is None else by_slot
        attempts = by_slot.get(slot, [])
        if self._status(attempts) != "free":
            return
        attempt = (attempts[-1].user_attrs["run"]["attempt"] + 1) if attempts else 0
        if slot >= self.n_trials:
            cfg, seed = self._finalist_config(slot)
            if cfg is None:
                return
        else:
            cfg, seed = self.plan[slot], self.seeds[0]
        if self._claim(slot, attempt):
            self._run(slot, attempt, cfg, seed)

    def _wait(self, slots: Sequence[int], ready: Callable[[Any], bool] | None = None) -> dict[int, list[Any]]:
        """Wait until every slot is done (or ``ready(latest attempt)``), taking over abandoned ones."""
        last_stale_check = 0.0
        while True:
            by_slot = self._trials_by_slot()
            pending = []
            for s in slots:
                attempts = by_slot.get(s, [])
                status = self._status(attempts)
                if status == "done" or (status == "running" and ready is not None and ready(attempts[-1])):
                    continue
                pending.append((s, status))
            if not pending:
                return by_slot
            for s, status in pending:
                if status == "free":
                    self._take(s)
            if time.monotonic() - last_stale_check > self.heartbeat_interval:
                self.optuna.storages.fail_stale_trials(self.study)
                last_stale_check = time.monotonic()
            self._tick(by_slot)
            time.sleep(self.poll)

    def _tick(self, by_slot: dict[int, list[Any]] | None = None) -> None:
        """Progress: runs done by any worker (counted when waiting) or by this one."""
        if self.bar is None or self.bar.disable:
            return
        if by_slot is None:
            self.bar.update(1)
        else:
            self.bar.n = sum(1 for ts in by_slot.values() if self._status(ts) == "done")
            self.bar.refresh()

    def _live_slots(self) -> list[int]:
        """Every slot that has a run to do: the search, and the finalists' other seeds that are not void."""
        return list(range(self._seed_slot(len(self._finalist_slots()), 0)))


def _outcome(t: Any) -> dict[str, Any]:
    return t.user_attrs.get("outcome", {})
