-- Forget timers whose outcome is committed in the database.
-- KEYS: in-flight set, in-flight due hash, attempts hash, recent set.
-- ARGV: recent window ms, then timer keys.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do
  local key = ARGV[i]
  redis.call('ZREM', KEYS[1], key)
  redis.call('HDEL', KEYS[2], key)
  redis.call('HDEL', KEYS[3], key)
  redis.call('ZADD', KEYS[4], now, key)
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[1]))
return #ARGV - 1
