-- A listener says it is alive, in Redis's clock so that hosts' clocks do not matter.
-- KEYS: listeners set.  ARGV: listener id.  Forgets listeners silent for a day.
local now = now_ms()
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 86400000)
return now
