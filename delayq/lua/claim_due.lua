-- Claim timers that are due, and timers whose lease ran out (their listener died, or a
-- failed attempt is waiting for its retry). A claimed timer moves from the due index to
-- the in-flight set with a lease; it leaves Redis only when its outcome is committed.
-- KEYS: heads, in-flight set, in-flight due hash.
-- ARGV: limit, lease ms, shard key prefix.
-- Returns {now in microseconds, next wake-up ms or -1, n, key1, due1, key2, due2, ...}:
-- the first n timers were claimed before (their lease ran out), so they may have fired
-- already.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local lease_until = now + tonumber(ARGV[2])
-- Microseconds, so the listener can sleep to the exact millisecond of the next due time.
local out = {tonumber(t[1]) * 1000000 + tonumber(t[2]), -1, 0}
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
for _, key in ipairs(stale) do
  redis.call('ZADD', KEYS[2], lease_until, key)
  out[#out + 1] = key
  out[#out + 1] = redis.call('HGET', KEYS[3], key) or now
end
out[3] = #stale
local room = limit - #stale
-- Due means due <= now in whole ms of Redis's clock: never before the due time.
local shards = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, room)
for _, shard_id in ipairs(shards) do
  if room <= 0 then break end
  local shard = ARGV[3] .. shard_id
  local due = redis.call('ZRANGEBYSCORE', shard, '-inf', now, 'WITHSCORES', 'LIMIT', 0, room)
  for i = 1, #due, 2 do
    local key = due[i]
    redis.call('ZREM', shard, key)
    redis.call('ZADD', KEYS[2], lease_until, key)
    redis.call('HSET', KEYS[3], key, due[i + 1])
    -- Touch the key so Redis expires it now (and emits its event now, while the timer is
    -- in flight), not minutes later when its own expiry cycle gets to it.
    redis.call('DEL', key)
    out[#out + 1] = key
    out[#out + 1] = due[i + 1]
  end
  room = room - #due / 2
  refresh_head(KEYS[1], shard, shard_id)
end
local next_due = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local next_lease = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local wake = -1
if #next_due > 0 then wake = tonumber(next_due[2]) end
if #next_lease > 0 and (wake < 0 or tonumber(next_lease[2]) < wake) then
  wake = tonumber(next_lease[2])
end
out[2] = wake
return out
