"""Redis Cluster (and Valkey cluster): timers spread over every primary.

Each hash slot is a partition holding a complete index, claims set and dead letters of
the timers whose keys hash to it, tagged so that they share the slot with those timer
keys (`slots.py`). A script therefore touches one slot, exactly as on one Redis, and the
load spreads over the primaries as the slots do, following them through failovers and
resharding.

* `url.py`: `redis+cluster://host:port,host:port` and the RedisCluster client.
* `slots.py`: the tag of each slot, and the partition keys of a timer key.
* `router.py`: script calls of many slots, pipelined per primary, with MOVED, ASK,
  TRYAGAIN and NOSCRIPT handled, and WAIT on the same connection.
* `store.py`: `ClusterStore`, the TimerStore of a cluster, with the due view that tells
  listeners which slots have something due.
* `events.py`: keyspace events and wake-ups from every primary, resubscribed when the
  topology changes.
"""
