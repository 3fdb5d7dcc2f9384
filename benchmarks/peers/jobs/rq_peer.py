"""RQ with its defaults: `rq worker --with-scheduler` (one worker, a forked work horse per
job; the scheduler moves due jobs from the scheduled registry every second), jobs
scheduled with `Queue.enqueue_at`."""

from __future__ import annotations

from datetime import UTC, datetime

from peer_common import Plan, main, record, redis_url
from redis import Redis
from rq import Queue

#: Jobs scheduled per pipeline.
PIPELINE = 500


def fire(job: str, due: float) -> None:
    record(job, due)


def enqueue(plan: Plan) -> None:
    connection = Redis.from_url(redis_url())
    queue = Queue(connection=connection)
    for i in range(0, len(plan), PIPELINE):
        with connection.pipeline() as pipe:
            for job, due in plan[i : i + PIPELINE]:
                when = datetime.fromtimestamp(due, UTC)
                # By name: run as a script, this module is __main__ here, which RQ refuses.
                queue.enqueue_at(when, "rq_peer.fire", job, due, job_id=job, pipeline=pipe)
            pipe.execute()
    connection.close()


if __name__ == "__main__":
    main(enqueue, enqueue)
