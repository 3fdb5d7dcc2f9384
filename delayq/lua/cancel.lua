-- Cancel timers (the order was paid). KEYS: heads, recent set, claims per key, then per
-- timer its timer key and its index shard. ARGV: per timer its shard number.
-- Returns per timer: 1 if a pending schedule was removed and no firing of the timer is
-- claimed (so none applies after this returns); 0 if nothing was pending; -1 if a
-- pending schedule was removed but an earlier firing is being applied right now.
local now = now_ms()
local out = {}
for i = 1, (#KEYS - 3) / 2 do
  local key, shard = KEYS[2 * i + 2], KEYS[2 * i + 3]
  local removed = false
  local due = redis.call('ZSCORE', shard, key)
  if due then
    redis.call('ZREM', shard, key)
    refresh_head(KEYS[1], shard, ARGV[i])
    removed = true
  end
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
