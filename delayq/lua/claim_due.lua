-- Claim firings that are due, and firings whose lease ran out (their listener died, a
-- failed attempt is waiting for its retry, or it was handed back). A claimed firing
-- leaves the due index for the claims set with a lease; it leaves Redis only when its
-- outcome is committed (ack) or it is given up on (dead letters).
-- KEYS: heads, claims, claims per key, pre-0.2 in-flight set, pre-0.2 in-flight due hash.
-- ARGV: limit, lease ms, shard key prefix, how many ms ahead of their due time timers
-- may be claimed (the listener holds such a firing until it is due: delayq/due_queue.py).
-- Returns {now in microseconds, next wake-up ms or -1, n, id1, id2, ...}: the first n
-- firings were claimed before, so their outcome may be committed already.
local us = now_us()
local now = math.floor(us / 1000)
local limit = tonumber(ARGV[1])
local lease_until = now + tonumber(ARGV[2])
local out = {us, -1, 0}
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(stale) do
  redis.call('ZADD', KEYS[2], lease_until, id)
  out[#out + 1] = id
end
local room = limit - #stale
-- What a listener from before firing ids held and did not finish: taken over the same way.
if room > 0 then
  local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, room)
  for _, key in ipairs(old) do
    local due = redis.call('HGET', KEYS[5], key) or now
    redis.call('ZREM', KEYS[4], key)
    redis.call('HDEL', KEYS[5], key)
    local id = add_claim(KEYS[2], KEYS[3], key, due, lease_until)
    if id then out[#out + 1] = id end
  end
end
out[3] = #out - 3
room = limit - out[3]
-- Due means due <= now in whole ms of Redis's clock, or within the claim-ahead window.
local horizon = now + (tonumber(ARGV[4]) or 0)
local shards = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', horizon, 'LIMIT', 0, room)
for _, shard_id in ipairs(shards) do
  if room <= 0 then break end
  local shard = ARGV[3] .. shard_id
  local due = redis.call('ZRANGEBYSCORE', shard, '-inf', horizon, 'WITHSCORES', 'LIMIT', 0, room)
  for i = 1, #due, 2 do
    local key, score = due[i], tonumber(due[i + 1])
    redis.call('ZREM', shard, key)
    local touch = may_touch(key)
    local ttl_due = nil
    if touch then ttl_due = expire_time(key) end
    if ttl_due and ttl_due > score then
      -- Re-armed (SETEX, EXPIRE) by a producer that does not use delayq after this entry
      -- was made, and the listener has not yet seen its 'expire' event: the last
      -- schedule wins, as it does for schedule_expiry.
      redis.call('ZADD', shard, ttl_due, key)
    else
      -- Touch the key so Redis expires it now (and emits its event now, while the
      -- firing is claimed), not minutes later when its own expiry cycle gets to it.
      if touch and (not ttl_due or ttl_due >= 0) then redis.call('DEL', key) end
      local id = add_claim(KEYS[2], KEYS[3], key, score, lease_until)
      if id then out[#out + 1] = id end
      room = room - 1
    end
  end
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
