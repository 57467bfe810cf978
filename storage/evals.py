"""Evaluation and canary storage: test-split items, evaluation runs and their results, and
the per-model figures a canary is judged by. Explicit SQL over the store's connections
(migration 11)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

import aiosqlite

from bot.domain import ChatKey, EvalItem, EvalResult, EvalRun, JobRecord, ModelFigures, utcnow
from storage.base import Part
from storage.jobs import JobStore
from storage.writer import Writer

RUN_COLUMNS = (
    "id, job_id, size, current_model, current_route, candidate_model, candidate_route,"
    " judge_model, requested_by, status, created_at, finished_at"
)


RESULT_COLUMNS = (
    "item_id",
    "outcome",
    "error",
    "current_answer",
    "current_latency_ms",
    "current_tokens",
    "candidate_answer",
    "candidate_latency_ms",
    "candidate_tokens",
    "verdict_ab",
    "confidence_ab",
    "reason_ab",
    "verdict_ba",
    "confidence_ba",
    "reason_ba",
)


# Per requested model, since a moment: text turns only (a photo goes to the vision model
# whichever arm its chat is in). A reply's follow-up is the next turn in its thread.
_FIGURES_SQL = """
WITH scoped AS (
    SELECT t.id, t.status, t.latency_ms, t.requested_model,
           COALESCE(t.input_tokens, 0) + COALESCE(t.output_tokens, 0) AS tokens,
           t.input_tokens IS NOT NULL OR t.output_tokens IS NOT NULL AS has_tokens,
           LEAD(t.id) OVER (PARTITION BY t.thread_id ORDER BY t.id) AS next_id
    FROM turns t
    WHERE t.started_at >= :since AND t.input_kind != 'photo'
)
SELECT s.requested_model,
       COUNT(*),
       SUM(s.status = 'failed'),
       SUM(s.status = 'ok'),
       SUM(s.status = 'ok' AND EXISTS (
           SELECT 1 FROM reactions r WHERE r.turn_id = s.id AND r.polarity > 0)),
       SUM(s.status = 'ok' AND EXISTS (
           SELECT 1 FROM reactions r WHERE r.turn_id = s.id AND r.polarity < 0)),
       SUM(s.status = 'ok' AND f.sentiment_label IS NOT NULL),
       SUM(s.status = 'ok' AND f.sentiment_label = 'negative'),
       SUM(s.status = 'ok' AND s.latency_ms IS NOT NULL),
       TOTAL(CASE WHEN s.status = 'ok' THEN s.latency_ms END),
       TOTAL(CASE WHEN s.status = 'ok' THEN s.latency_ms * s.latency_ms END),
       SUM(s.status = 'ok' AND s.has_tokens),
       TOTAL(CASE WHEN s.status = 'ok' AND s.has_tokens THEN s.tokens END),
       TOTAL(CASE WHEN s.status = 'ok' AND s.has_tokens THEN s.tokens * s.tokens END)
FROM scoped s LEFT JOIN messages f ON f.turn_id = s.next_id AND f.role = 'user'
WHERE s.requested_model IN ({marks})
GROUP BY s.requested_model
"""


class EvalStore(Part):
    """Reads through the store's reader, writes through its writer (one transaction each)."""

    def __init__(self, conn: aiosqlite.Connection, writer: Writer, jobs: JobStore) -> None:
        super().__init__(conn, writer)
        self._jobs = jobs

    async def job(self, job_id: str) -> JobRecord | None:
        return await self._jobs.get(job_id)

    # -- the test split -----------------------------------------------------------------

    async def add_items(
        self, job_id: str, items: Sequence[tuple[list[dict[str, str]], str, Sequence[int]]]
    ) -> int:
        """Keep a job's test split: (messages, reference answer, turn ids) per item, in order."""

        def insert(conn: sqlite3.Connection) -> int:
            for position, (messages, reference, turn_ids) in enumerate(items):
                item_id = conn.execute(
                    "INSERT INTO eval_items (job_id, position, context, reference)"
                    " VALUES (?, ?, ?, ?)",
                    (job_id, position, json.dumps(messages, ensure_ascii=False), reference),
                ).lastrowid
                conn.executemany(
                    "INSERT OR IGNORE INTO eval_item_turns (item_id, turn_id) VALUES (?, ?)",
                    [(item_id, t) for t in turn_ids],
                )
            return len(items)

        return await self._write(insert)

    async def item_count(self, job_id: str) -> int:
        rows = await self._fetch_all("SELECT COUNT(*) FROM eval_items WHERE job_id = ?", (job_id,))
        return int(rows[0][0])

    async def items(self, job_id: str, limit: int) -> list[EvalItem]:
        """The first `limit` items of a job's test split (the most recent conversations)."""
        rows = await self._fetch_all(
            "SELECT id, position, context, reference FROM eval_items WHERE job_id = ?"
            " ORDER BY position LIMIT ?",
            (job_id, limit),
        )
        return [EvalItem(int(i), int(p), json.loads(c), str(r)) for i, p, c, r in rows]

    async def forget_items(self) -> int:
        """Remove items made from turns /forget deleted or redacted (with their results)."""
        return await self._write(
            lambda conn: (
                conn.execute(
                    "DELETE FROM eval_items WHERE id IN (SELECT it.item_id FROM eval_item_turns it"
                    " LEFT JOIN turns t ON t.id = it.turn_id"
                    " WHERE t.id IS NULL OR it.turn_id IN (SELECT turn_id FROM dataset_exclusions))"
                ).rowcount
            )
        )

    # -- runs and results ---------------------------------------------------------------

    async def create_run(
        self,
        job_id: str,
        size: int,
        *,
        current: tuple[str, str],
        candidate: tuple[str, str],
        judge_model: str,
        requested_by: int,
    ) -> EvalRun:
        now = utcnow()
        run_id = await self._write(
            lambda conn: (
                conn.execute(
                    "INSERT INTO eval_runs (job_id, size, current_model, current_route,"
                    " candidate_model, candidate_route, judge_model, requested_by, status,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'running', ?)",
                    (job_id, size, *current, *candidate, judge_model, requested_by, now),
                ).lastrowid
            )
        )
        assert run_id is not None
        return EvalRun(
            run_id,
            job_id,
            size,
            *current,
            *candidate,
            judge_model,
            requested_by,
            "running",
            now,
            None,
        )

    async def run(self, run_id: int) -> EvalRun | None:
        rows = await self._fetch_all(f"SELECT {RUN_COLUMNS} FROM eval_runs WHERE id = ?", (run_id,))
        return EvalRun(*rows[0]) if rows else None

    async def last_run(self, job_id: str) -> EvalRun | None:
        rows = await self._fetch_all(
            f"SELECT {RUN_COLUMNS} FROM eval_runs WHERE job_id = ? ORDER BY id DESC LIMIT 1",
            (job_id,),
        )
        return EvalRun(*rows[0]) if rows else None

    async def unfinished_runs(self) -> list[EvalRun]:
        rows = await self._fetch_all(
            f"SELECT {RUN_COLUMNS} FROM eval_runs WHERE status = 'running' ORDER BY id"
        )
        return [EvalRun(*row) for row in rows]

    async def judged(self, run_id: int) -> set[int]:
        """Items of a run that have their outcome already (an interrupted run skips them)."""
        rows = await self._fetch_all("SELECT item_id FROM eval_results WHERE run_id = ?", (run_id,))
        return {int(row[0]) for row in rows}

    async def add_result(self, run_id: int, result: EvalResult) -> None:
        values = [getattr(result, c) for c in RESULT_COLUMNS]
        marks = ", ".join("?" * (len(RESULT_COLUMNS) + 2))
        now = utcnow()

        def insert(conn: sqlite3.Connection) -> None:
            # An item removed meanwhile (/forget) has no result to keep.
            if conn.execute("SELECT 1 FROM eval_items WHERE id = ?", (result.item_id,)).fetchone():
                conn.execute(
                    f"INSERT OR REPLACE INTO eval_results (run_id, {', '.join(RESULT_COLUMNS)},"
                    f" finished_at) VALUES ({marks})",
                    (run_id, *values, now),
                )

        await self._write(insert)

    async def finish_run(self, run_id: int) -> None:
        now = utcnow()
        await self._write(
            lambda conn: conn.execute(
                "UPDATE eval_runs SET status = 'done', finished_at = ? WHERE id = ?",
                (now, run_id),
            )
        )

    async def results(self, run_id: int) -> list[EvalResult]:
        rows = await self._fetch_all(
            f"SELECT {', '.join('r.' + c for c in RESULT_COLUMNS)} FROM eval_results r"
            " JOIN eval_items i ON i.id = r.item_id WHERE r.run_id = ? ORDER BY i.position",
            (run_id,),
        )
        return [EvalResult(*row) for row in rows]

    # -- the canary ----------------------------------------------------------------------

    async def conversation_began(self, key: ChatKey) -> str | None:
        """When a chat's conversation under way began: the creation of the first thread in
        the chain its open thread carries on (threads.parent_thread_id); None if it has no
        open thread (its next message begins a conversation)."""
        rows = await self._fetch_all(
            "WITH RECURSIVE chain (id, parent, created_at) AS ("
            " SELECT id, parent_thread_id, created_at FROM threads WHERE id = ("
            "  SELECT id FROM threads WHERE chat_id = ? AND topic_id = ? AND closed_at IS NULL"
            "  ORDER BY id DESC LIMIT 1)"
            " UNION SELECT th.id, th.parent_thread_id, th.created_at"
            "  FROM threads th JOIN chain ON th.id = chain.parent)"
            " SELECT MIN(created_at) FROM chain",
            (key.chat_id, key.topic_id),
        )
        return str(rows[0][0]) if rows and rows[0][0] is not None else None

    async def model_figures(self, models: Sequence[str], since: str) -> dict[str, ModelFigures]:
        """Sums over each model's text turns since `since` (models with none are absent)."""
        marks = ", ".join("?" * len(models))
        rows = await self._fetch_all(
            _FIGURES_SQL.replace(":since", "?").format(marks=marks), (since, *models)
        )
        return {
            str(model): ModelFigures(*(0 if v is None else v for v in values))
            for model, *values in rows
        }
