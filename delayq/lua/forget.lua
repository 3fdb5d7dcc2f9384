-- A producer that does not use delayq disarmed its timer with DEL (named by 'del'
-- keyspace events): drop the index entry of each key that is gone and not yet due. A key
-- that exists again was re-armed since (its 'expire' event adopts it); an entry already
-- due is fired (the order's status still decides what the action does).
-- KEYS: heads. ARGV: shard key prefix, layout key, default shard count, then per key the
-- key and its hash. Returns the number of entries dropped.
local now = now_ms()
local n, p = read_layout(ARGV[2], ARGV[3])
local count = 0
for i = 4, #ARGV, 2 do
  local key = ARGV[i]
  if redis.call('EXISTS', key) == 0 then
    local ids = shard_ids(ARGV[i + 1], n, p)
    local _, due = find_entry(ARGV[1], ids, key)
    if due and tonumber(due) > now then
      unindex(KEYS[1], ARGV[1], ids, key)
      count = count + 1
    end
  end
end
return count
