-- adopt.lua for the sweep on a cluster: the keys one SCAN step found on one node, of many
-- slots, adopted in one call instead of one per slot (keys of other slots on the same
-- node are passed in ARGV, which the flags line allows; Redis refuses a key that is not
-- on this node, e.g. one moving with a migrating slot, and the caller then adopts slot by
-- slot). Registered with the flags line first, then the clock and the prelude.
-- ARGV: per key: the key, its partition's heads key, index shard key and wake channel.
-- Returns the number of keys (re)indexed.
local n = 0
for i = 1, #ARGV, 4 do
  local key, heads, shard, wake = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local due = expire_time(key)
  if due and due > 0 then
    local indexed = redis.call('ZSCORE', shard, key)
    if not indexed or tonumber(indexed) ~= due then
      local head = redis.call('ZRANGE', heads, 0, 0, 'WITHSCORES')
      redis.call('ZADD', shard, due, key)
      refresh_head(heads, shard, '0')
      n = n + 1
      if #head == 0 or due < tonumber(head[2]) then redis.call('PUBLISH', wake, due) end
    end
  end
end
return n
