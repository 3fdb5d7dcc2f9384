-- Adopt TTL keys set by producers that do not use delayq (SETEX, PSETEX, SET PX/PXAT,
-- EXPIRE), named by 'expire' keyspace events or found by the sweep: index each at its
-- expiry time, so it fires exactly and durably like any timer. Keys delayq scheduled
-- itself are already indexed at that time and are left alone.
-- KEYS: heads. ARGV: wake channel, shard key prefix, then per key the key and its shard
-- number. Returns the number of keys (re)indexed.
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local earliest = nil
local n = 0
for i = 3, #ARGV, 2 do
  local key, shard_id = ARGV[i], ARGV[i + 1]
  local due = expire_time(key)
  if due and due > 0 then
    local shard = ARGV[2] .. shard_id
    local indexed = redis.call('ZSCORE', shard, key)
    if not indexed or tonumber(indexed) ~= due then
      redis.call('ZADD', shard, due, key)
      refresh_head(KEYS[1], shard, shard_id)
      n = n + 1
      if earliest == nil or due < earliest then earliest = due end
    end
  end
end
if earliest ~= nil and (#head == 0 or earliest < tonumber(head[2])) then
  redis.call('PUBLISH', ARGV[1], earliest)
end
return n
