-- Forget firings whose outcome is committed in the database. Only the firings named are
-- touched: a newer firing of the same timer stays claimed. On one Redis the batch is also
-- counted in its minute's statistics (delayq/firing_stats.py) here, in the same call; a
-- cluster keeps those on the namespace's own slot (record_firings.lua).
-- KEYS: claims, claims per key, attempts hash, recent set; optionally the minute's
-- statistics hash.
-- ARGV: recent window ms, the number n of firing ids, the ids; with the statistics hash,
-- then the ms to keep it and per field its increment.
local now = now_ms()
local n = tonumber(ARGV[2])
for i = 3, n + 2 do
  local id = ARGV[i]
  drop_claim(KEYS[1], KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZADD', KEYS[4], now, firing_key(id))
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[1]))
if KEYS[5] then
  -- Best effort (pcall): the acknowledgement above is what counts.
  for i = n + 4, #ARGV, 2 do
    redis.pcall('HINCRBY', KEYS[5], ARGV[i], ARGV[i + 1])
  end
  redis.pcall('PEXPIRE', KEYS[5], ARGV[n + 3])
end
return n
