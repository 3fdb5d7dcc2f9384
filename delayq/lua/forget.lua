-- A producer that does not use delayq disarmed its timer with DEL (named by 'del'
-- keyspace events): drop the index entry of each key that is gone and not yet due. A key
-- that exists again was re-armed since (its 'expire' event adopts it); an entry already
-- due is fired (the order's status still decides what the action does).
-- KEYS: heads. ARGV: shard key prefix, then per key the key and its shard number.
-- Returns the number of entries dropped.
local now = now_ms()
local n = 0
for i = 2, #ARGV, 2 do
  local key, shard_id = ARGV[i], ARGV[i + 1]
  if redis.call('EXISTS', key) == 0 then
    local shard = ARGV[1] .. shard_id
    local due = redis.call('ZSCORE', shard, key)
    if due and tonumber(due) > now then
      redis.call('ZREM', shard, key)
      refresh_head(KEYS[1], shard, shard_id)
      n = n + 1
    end
  end
end
return n
