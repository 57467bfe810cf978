"""Evaluation and canary storage on PostgreSQL (storage/evals.py's twin): test-split items,
evaluation runs and their results, and the per-model figures a canary is judged by."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from psycopg_pool import AsyncConnectionPool

from bot.domain import ChatKey, EvalItem, EvalResult, EvalRun, JobRecord, ModelFigures, utcnow
from storage.evals import RESULT_COLUMNS, RUN_COLUMNS
from storage.pg.base import Conn, Health, PgPart
from storage.pg.jobs import PgJobStore

# As storage/evals.py's, in PostgreSQL's terms: counts of rows that meet a condition are
# COUNT(*) FILTER (integers); SQLite's TOTAL (a float, 0.0 over no rows) is a float8 SUM
# with COALESCE, squared in float8 so that long latencies and large token counts can't
# overflow an INTEGER.
_FIGURES_SQL = """
WITH scoped AS (
    SELECT t.id, t.status, t.latency_ms, t.requested_model,
           COALESCE(t.input_tokens, 0) + COALESCE(t.output_tokens, 0) AS tokens,
           t.input_tokens IS NOT NULL OR t.output_tokens IS NOT NULL AS has_tokens,
           LEAD(t.id) OVER (PARTITION BY t.thread_id ORDER BY t.id) AS next_id
    FROM turns t
    WHERE t.started_at >= %s AND t.input_kind != 'photo'
)
SELECT s.requested_model,
       COUNT(*),
       COUNT(*) FILTER (WHERE s.status = 'failed'),
       COUNT(*) FILTER (WHERE s.status = 'ok'),
       COUNT(*) FILTER (WHERE s.status = 'ok' AND EXISTS (
           SELECT 1 FROM reactions r WHERE r.turn_id = s.id AND r.polarity > 0)),
       COUNT(*) FILTER (WHERE s.status = 'ok' AND EXISTS (
           SELECT 1 FROM reactions r WHERE r.turn_id = s.id AND r.polarity < 0)),
       COUNT(*) FILTER (WHERE s.status = 'ok' AND f.sentiment_label IS NOT NULL),
       COUNT(*) FILTER (WHERE s.status = 'ok' AND f.sentiment_label = 'negative'),
       COUNT(*) FILTER (WHERE s.status = 'ok' AND s.latency_ms IS NOT NULL),
       COALESCE(SUM(s.latency_ms::float8) FILTER (WHERE s.status = 'ok'), 0),
       COALESCE(SUM(s.latency_ms::float8 * s.latency_ms) FILTER (WHERE s.status = 'ok'), 0),
       COUNT(*) FILTER (WHERE s.status = 'ok' AND s.has_tokens),
       COALESCE(SUM(s.tokens::float8) FILTER (WHERE s.status = 'ok' AND s.has_tokens), 0),
       COALESCE(SUM(s.tokens::float8 * s.tokens) FILTER (WHERE s.status = 'ok' AND s.has_tokens),
                0)
FROM scoped s LEFT JOIN messages f ON f.turn_id = s.next_id AND f.role = 'user'
WHERE s.requested_model = ANY(%s::text[])
GROUP BY s.requested_model
"""

_CONVERSATION_BEGAN_SQL = """
WITH RECURSIVE chain (id, parent, created_at) AS (
    SELECT id, parent_thread_id, created_at FROM threads WHERE id = (
        SELECT id FROM threads WHERE chat_id = %s AND topic_id = %s AND closed_at IS NULL
        ORDER BY id DESC LIMIT 1)
    UNION SELECT th.id, th.parent_thread_id, th.created_at
        FROM threads th JOIN chain ON th.id = chain.parent)
SELECT MIN(created_at) FROM chain
"""


class PgEvalStore(PgPart):
    """Items, runs, results and canary figures; each write one transaction."""

    def __init__(self, pool: AsyncConnectionPool[Any], health: Health, jobs: PgJobStore) -> None:
        super().__init__(pool, health)
        self._jobs = jobs

    async def job(self, job_id: str) -> JobRecord | None:
        return await self._jobs.get(job_id)

    # -- the test split -----------------------------------------------------------------

    async def add_items(
        self, job_id: str, items: Sequence[tuple[list[dict[str, str]], str, Sequence[int]]]
    ) -> int:
        """Keep a job's test split: (messages, reference answer, turn ids) per item, in order."""

        async def insert(conn: Conn) -> int:
            async with conn.cursor() as cur:
                for position, (messages, reference, turn_ids) in enumerate(items):
                    await cur.execute(
                        "INSERT INTO eval_items (job_id, position, context, reference)"
                        " VALUES (%s, %s, %s, %s) RETURNING id",
                        (job_id, position, json.dumps(messages, ensure_ascii=False), reference),
                    )
                    row = await cur.fetchone()
                    assert row is not None
                    await cur.executemany(
                        "INSERT INTO eval_item_turns (item_id, turn_id) VALUES (%s, %s)"
                        " ON CONFLICT DO NOTHING",
                        [(row[0], t) for t in turn_ids],
                    )
            return len(items)

        return await self._write(insert)

    async def item_count(self, job_id: str) -> int:
        row = await self._fetch_one("SELECT COUNT(*) FROM eval_items WHERE job_id = %s", (job_id,))
        return int(row[0]) if row else 0

    async def items(self, job_id: str, limit: int) -> list[EvalItem]:
        """The first `limit` items of a job's test split (the most recent conversations)."""
        rows = await self._fetch_all(
            "SELECT id, position, context, reference FROM eval_items WHERE job_id = %s"
            " ORDER BY position LIMIT %s",
            (job_id, limit),
        )
        return [EvalItem(int(i), int(p), json.loads(c), str(r)) for i, p, c, r in rows]

    async def forget_items(self) -> int:
        """Remove items made from turns /forget deleted or redacted (with their results)."""

        async def delete(conn: Conn) -> int:
            cur = await conn.execute(
                "DELETE FROM eval_items WHERE id IN (SELECT it.item_id FROM eval_item_turns it"
                " LEFT JOIN turns t ON t.id = it.turn_id"
                " WHERE t.id IS NULL OR it.turn_id IN (SELECT turn_id FROM dataset_exclusions))"
            )
            return cur.rowcount

        return await self._write(delete)

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

        async def insert(conn: Conn) -> int:
            cur = await conn.execute(
                "INSERT INTO eval_runs (job_id, size, current_model, current_route,"
                " candidate_model, candidate_route, judge_model, requested_by, status,"
                " created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 'running', %s)"
                " RETURNING id",
                (job_id, size, *current, *candidate, judge_model, requested_by, now),
            )
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

        run_id = await self._write(insert)
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
        row = await self._fetch_one(f"SELECT {RUN_COLUMNS} FROM eval_runs WHERE id = %s", (run_id,))
        return EvalRun(*row) if row else None

    async def last_run(self, job_id: str) -> EvalRun | None:
        row = await self._fetch_one(
            f"SELECT {RUN_COLUMNS} FROM eval_runs WHERE job_id = %s ORDER BY id DESC LIMIT 1",
            (job_id,),
        )
        return EvalRun(*row) if row else None

    async def unfinished_runs(self) -> list[EvalRun]:
        rows = await self._fetch_all(
            f"SELECT {RUN_COLUMNS} FROM eval_runs WHERE status = 'running' ORDER BY id"
        )
        return [EvalRun(*row) for row in rows]

    async def judged(self, run_id: int) -> set[int]:
        """Items of a run that have their outcome already (an interrupted run skips them)."""
        rows = await self._fetch_all(
            "SELECT item_id FROM eval_results WHERE run_id = %s", (run_id,)
        )
        return {int(row[0]) for row in rows}

    async def add_result(self, run_id: int, result: EvalResult) -> None:
        values = [getattr(result, c) for c in RESULT_COLUMNS]
        marks = ", ".join(["%s"] * (len(RESULT_COLUMNS) + 2))
        replace = ", ".join(f"{c} = excluded.{c}" for c in (*RESULT_COLUMNS, "finished_at"))
        now = utcnow()

        async def insert(conn: Conn) -> None:
            # An item removed meanwhile (/forget) has no result to keep; the row lock keeps
            # it from being removed until this result is in (then it goes with the item).
            cur = await conn.execute(
                "SELECT 1 FROM eval_items WHERE id = %s FOR KEY SHARE", (result.item_id,)
            )
            if await cur.fetchone():
                await conn.execute(
                    f"INSERT INTO eval_results (run_id, {', '.join(RESULT_COLUMNS)},"
                    f" finished_at) VALUES ({marks})"
                    f" ON CONFLICT (run_id, item_id) DO UPDATE SET {replace}",
                    (run_id, *values, now),
                )

        await self._write(insert)

    async def finish_run(self, run_id: int) -> None:
        now = utcnow()

        async def update(conn: Conn) -> None:
            await conn.execute(
                "UPDATE eval_runs SET status = 'done', finished_at = %s WHERE id = %s",
                (now, run_id),
            )

        await self._write(update)

    async def results(self, run_id: int) -> list[EvalResult]:
        rows = await self._fetch_all(
            f"SELECT {', '.join('r.' + c for c in RESULT_COLUMNS)} FROM eval_results r"
            " JOIN eval_items i ON i.id = r.item_id WHERE r.run_id = %s ORDER BY i.position",
            (run_id,),
        )
        return [EvalResult(*row) for row in rows]

    # -- the canary ----------------------------------------------------------------------

    async def conversation_began(self, key: ChatKey) -> str | None:
        """When a chat's conversation under way began: the creation of the first thread in
        the chain its open thread carries on (threads.parent_thread_id); None if it has no
        open thread (its next message begins a conversation)."""
        row = await self._fetch_one(_CONVERSATION_BEGAN_SQL, (key.chat_id, key.topic_id))
        return str(row[0]) if row and row[0] is not None else None

    async def model_figures(self, models: Sequence[str], since: str) -> dict[str, ModelFigures]:
        """Sums over each model's text turns since `since` (models with none are absent)."""
        rows = await self._fetch_all(_FIGURES_SQL, (since, list(models)))
        return {str(model): ModelFigures(*values) for model, *values in rows}
