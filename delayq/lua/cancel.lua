-- Cancel timers (the order was paid). KEYS: heads, recent set, claims per key, then the
-- timer keys (in a cluster, then the partition's shard). ARGV: shard key prefix, layout
-- key, default shard count, then per timer its hash (delayq.keys.key_hash).
-- Returns per timer: 1 if a pending schedule was removed and no firing of the timer is
-- claimed (so none applies after this returns); 0 if nothing was pending; -1 if a
-- pending schedule was removed but an earlier firing is being applied right now.
local now = now_ms()
local n, p = read_layout(ARGV[2], ARGV[3])
local out = {}
for i = 4, #ARGV do
  local key = KEYS[i]
  local ids = shard_ids(ARGV[i], n, p)
  local removed = false
  local _, due = find_entry(ARGV[1], ids, key)
  if due then removed = unindex(KEYS[1], ARGV[1], ids, key) end
  local ttl_due = expire_time(key) or -2
  if redis.call('DEL', key) == 1 then removed = true end
  -- Due but not yet claimed: deleting the key makes Redis emit 'expired'; the tombstone
  -- stops a listener from taking that event for a legacy timer.
  if (due and tonumber(due) <= now) or (ttl_due >= 0 and ttl_due <= now) then
    redis.call('ZADD', KEYS[2], now, key)
  end
  local state = 0
  if removed then state = 1 end
  if redis.call('HEXISTS', KEYS[3], key) == 1 then
    if removed then state = -1 else state = 0 end
  end
  out[#out + 1] = state
end
return out
