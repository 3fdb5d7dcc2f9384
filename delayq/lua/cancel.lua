-- Cancel timers (the order was paid). KEYS: heads, recent set, then per
-- timer its timer key and its index shard. ARGV: per timer its shard number.
-- Returns 1 per timer that was still pending, 0 per timer that was not (never set,
-- already fired, or being fired now).
local now = now_ms()
local out = {}
for i = 1, (#KEYS - 2) / 2 do
  local key, shard = KEYS[2 * i + 1], KEYS[2 * i + 2]
  local removed = 0
  local score = redis.call('ZSCORE', shard, key)
  if score then
    redis.call('ZREM', shard, key)
    refresh_head(KEYS[1], shard, ARGV[i])
    -- Due but not yet claimed: deleting the key below makes Redis emit 'expired';
    -- the tombstone stops a listener from taking that event for a legacy timer.
    if tonumber(score) <= now then redis.call('ZADD', KEYS[2], now, key) end
    removed = 1
  end
  if redis.call('DEL', key) == 1 then removed = 1 end
  out[#out + 1] = removed
end
return out
