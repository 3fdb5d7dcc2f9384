-- A firing failed: retry it after a capped exponential backoff, or dead-letter it after
-- too many attempts. The lease doubles as the retry timer: when it runs out, claim_due
-- picks the timer up again with its original due time.
-- KEYS: in-flight set, in-flight due hash, attempts hash, dead hash.
-- ARGV: max attempts, backoff base ms, backoff cap ms, error text, then timer keys.
-- Returns the number of timers dead-lettered.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_attempts = tonumber(ARGV[1])
local dead = 0
for i = 5, #ARGV do
  local key = ARGV[i]
  local n = redis.call('HINCRBY', KEYS[3], key, 1)
  if n >= max_attempts then
    local due = redis.call('HGET', KEYS[2], key) or now
    redis.call('HSET', KEYS[4], key, cjson.encode(
      {due_ms = tonumber(due), attempts = n, error = ARGV[4], dead_ms = now}))
    redis.call('ZREM', KEYS[1], key)
    redis.call('HDEL', KEYS[2], key)
    redis.call('HDEL', KEYS[3], key)
    dead = dead + 1
  else
    local backoff = math.min(tonumber(ARGV[3]), tonumber(ARGV[2]) * 2 ^ (n - 1))
    redis.call('ZADD', KEYS[1], now + math.floor(backoff), key)
  end
end
return dead
