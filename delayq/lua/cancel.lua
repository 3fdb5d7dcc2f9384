-- Cancel timers (the order was paid). KEYS: due index, recent set, then timer keys.
-- Returns 1 per timer that was still pending, 0 per timer that was not (never set,
-- already fired, or being fired now).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 3, #KEYS do
  local key = KEYS[i]
  local removed = 0
  local score = redis.call('ZSCORE', KEYS[1], key)
  if score then
    redis.call('ZREM', KEYS[1], key)
    -- Due but not yet claimed: deleting the key below makes Redis emit 'expired';
    -- the tombstone stops a listener from taking that event for a legacy timer.
    if tonumber(score) <= now then redis.call('ZADD', KEYS[2], now, key) end
    removed = 1
  end
  if redis.call('DEL', key) == 1 then removed = 1 end
  out[#out + 1] = removed
end
return out
