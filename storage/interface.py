"""What the rest of the bot may name of storage: each part as either database offers it.

The SQLite store (storage/db.py and its parts) and the PostgreSQL one (storage/pg/) have the
same parts with the same methods, arguments and results (domain types from bot/domain.py);
services are typed against these names, and mypy checks every call against both
implementations. At run time the names are the SQLite classes: PostgreSQL's driver is an
install extra (`parley[postgres]`), imported only when DATABASE_URL names such a database.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from storage.dataset import DatasetSnapshot as _SqliteSnapshot
from storage.dataset import DatasetSource as _SqliteDataset
from storage.db import Store as _SqliteStore
from storage.evals import EvalStore as _SqliteEvals
from storage.forget import ForgetStore as _SqliteForget
from storage.jobs import JobStore as _SqliteJobs
from storage.settings import SettingsStore as _SqliteSettings
from storage.stats import StatsStore as _SqliteStats
from storage.threads import ThreadStore as _SqliteThreads

if TYPE_CHECKING:
    from storage.pg.dataset import PgDatasetSnapshot, PgDatasetSource
    from storage.pg.db import PgStore
    from storage.pg.evals import PgEvalStore
    from storage.pg.forget import PgForgetStore
    from storage.pg.jobs import PgJobStore
    from storage.pg.settings import PgSettingsStore
    from storage.pg.stats import PgStatsStore
    from storage.pg.threads import PgThreadStore

    Store = _SqliteStore | PgStore
    ThreadStore = _SqliteThreads | PgThreadStore
    StatsStore = _SqliteStats | PgStatsStore
    SettingsStore = _SqliteSettings | PgSettingsStore
    JobStore = _SqliteJobs | PgJobStore
    ForgetStore = _SqliteForget | PgForgetStore
    EvalStore = _SqliteEvals | PgEvalStore
    DatasetSource = _SqliteDataset | PgDatasetSource
    DatasetSnapshot = _SqliteSnapshot | PgDatasetSnapshot
else:
    Store = _SqliteStore
    ThreadStore = _SqliteThreads
    StatsStore = _SqliteStats
    SettingsStore = _SqliteSettings
    JobStore = _SqliteJobs
    ForgetStore = _SqliteForget
    EvalStore = _SqliteEvals
    DatasetSource = _SqliteDataset
    DatasetSnapshot = _SqliteSnapshot
