"""arq with its defaults: `arq arq_peer.WorkerSettings` (max_jobs 10, poll_delay 0.5 s),
jobs deferred with `enqueue_job(..., _defer_until=...)`."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from arq import create_pool
from arq.connections import RedisSettings
from peer_common import Plan, main, mark_ready, record, redis_url

#: Jobs enqueued concurrently (arq enqueues one job per WATCH/MULTI/EXEC).
ENQUEUE_CONCURRENCY = 200


async def fire(ctx: dict[str, Any], job: str, due: float) -> None:
    record(job, due)


async def startup(ctx: dict[str, Any]) -> None:
    mark_ready()


class WorkerSettings:
    functions = [fire]  # noqa: RUF012 (arq reads class attributes)
    redis_settings = RedisSettings.from_dsn(redis_url())
    on_startup = startup


async def _enqueue(plan: Plan) -> None:
    pool = await create_pool(RedisSettings.from_dsn(redis_url()))
    try:
        for i in range(0, len(plan), ENQUEUE_CONCURRENCY):
            await asyncio.gather(
                *(
                    pool.enqueue_job(
                        "fire", job, due, _job_id=job, _defer_until=datetime.fromtimestamp(due, UTC)
                    )
                    for job, due in plan[i : i + ENQUEUE_CONCURRENCY]
                )
            )
    finally:
        await pool.aclose()


def enqueue(plan: Plan) -> None:
    asyncio.run(_enqueue(plan))


if __name__ == "__main__":
    main(enqueue, enqueue)
