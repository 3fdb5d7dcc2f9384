-- Forget firings whose outcome is committed in the database. Only the firings named are
-- touched: a newer firing of the same timer stays claimed.
-- KEYS: claims, claims per key, attempts hash, recent set.
-- ARGV: recent window ms, then firing ids.
local now = now_ms()
for i = 2, #ARGV do
  local id = ARGV[i]
  drop_claim(KEYS[1], KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZADD', KEYS[4], now, firing_key(id))
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[1]))
return #ARGV - 1
