#!lua flags=no-writes,allow-cross-slot-keys
-- The figures of many slots on one cluster node, for `delayq status`, /metrics and the
-- dashboard: one call per chunk of a primary's slots instead of four or five commands
-- per slot. Run on one node with every key it reads passed in ARGV (slots of other
-- nodes would be refused).
-- Loaded on its own (no prelude: the flags line must come first).
-- ARGV[1]: now (ms); then per slot its due shard, its claims and its dead letters.
-- Returns {pending, overdue, in flight, dead-lettered, next due (ms, -1: none), i...}:
-- the totals over the slots, then the position (1-based) of each slot that has dead
-- letters, so that only those are read for the list.
local now = tonumber(ARGV[1])
local pending, overdue, inflight, dead, next_due = 0, 0, 0, 0, -1
local with_dead = {}
for i = 1, (#ARGV - 1) / 3 do
  local due = ARGV[3 * i - 1]
  local n = redis.call('ZCARD', due)
  if n > 0 then
    pending = pending + n
    local first = tonumber(redis.call('ZRANGE', due, 0, 0, 'WITHSCORES')[2])
    if next_due < 0 or first < next_due then
      next_due = first
    end
    if first <= now then
      overdue = overdue + redis.call('ZCOUNT', due, '-inf', now)
    end
  end
  inflight = inflight + redis.call('ZCARD', ARGV[3 * i])
  local d = redis.call('HLEN', ARGV[3 * i + 1])
  if d > 0 then
    dead = dead + d
    with_dead[#with_dead + 1] = i
  end
end
local out = {pending, overdue, inflight, dead, next_due}
for _, i in ipairs(with_dead) do
  out[#out + 1] = i
end
return out
