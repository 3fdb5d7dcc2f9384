-- Adopt TTL keys set by producers that do not use delayq (SETEX, PSETEX, SET PX/PXAT,
-- EXPIRE), named by 'expire' keyspace events or found by the sweep: index each at its
-- expiry time, so it fires exactly and durably like any timer. Keys delayq scheduled
-- itself are already indexed at that time and are left alone.
-- KEYS: heads. ARGV: wake channel, shard key prefix, layout key, default shard count,
-- then per key the key and its hash. Returns the number of keys (re)indexed.
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local n, p = read_layout(ARGV[3], ARGV[4])
local earliest = nil
local count = 0
for i = 5, #ARGV, 2 do
  local key = ARGV[i]
  local due = expire_time(key)
  if due and due > 0 then
    local ids = shard_ids(ARGV[i + 1], n, p)
    local at, indexed = find_entry(ARGV[2], ids, key)
    if at ~= ids[1] or tonumber(indexed) ~= due then
      -- Indexed where writes put it (a resize may not have moved it yet).
      unindex(KEYS[1], ARGV[2], ids, key)
      local shard = ARGV[2] .. ids[1]
      redis.call('ZADD', shard, due, key)
      refresh_head(KEYS[1], shard, ids[1])
      count = count + 1
      if earliest == nil or due < earliest then earliest = due end
    end
  end
end
if earliest ~= nil and (#head == 0 or earliest < tonumber(head[2])) then
  redis.call('PUBLISH', ARGV[1], earliest)
end
return count
