"""Celery with its defaults and the Redis broker: `celery -A celery_peer worker` (prefork,
concurrency = the CPU count, prefetch multiplier 4), tasks sent with
`apply_async(eta=...)`. A worker takes ETA tasks off the broker at once and holds them in
its own memory until they fall due."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from celery import Celery
from celery.signals import worker_ready
from peer_common import Plan, main, mark_ready, record, redis_url

app = Celery("celery_peer", broker=redis_url())


@app.task(name="fire")  # type: ignore[untyped-decorator]
def fire(job: str, due: float) -> None:
    record(job, due)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _ready(**kwargs: Any) -> None:
    mark_ready()


def enqueue(plan: Plan) -> None:
    with app.producer_or_acquire() as producer:
        for job, due in plan:
            fire.apply_async(
                (job, due), eta=datetime.fromtimestamp(due, UTC), task_id=job, producer=producer
            )


if __name__ == "__main__":
    main(enqueue, enqueue)
