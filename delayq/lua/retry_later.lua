-- Firings failed: retry each after a capped exponential backoff, or dead-letter it after
-- too many attempts. The lease doubles as the retry timer: when it runs out, claim_due
-- takes the firing again. A firing that is no longer claimed (another listener has
-- acknowledged it meanwhile) is left alone: it must not come back.
-- A dead-lettered firing leaves a tombstone, as an acknowledged one does, so the
-- 'expired' event of its claim is not taken for a legacy timer and fired again.
-- KEYS: claims, claims per key, attempts hash, dead hash, recent set, dead index.
-- ARGV: max attempts, backoff base ms, backoff cap ms, error text, then firing ids.
-- Returns the number of firings dead-lettered.
local now = now_ms()
local max_attempts = tonumber(ARGV[1])
local dead = 0
for i = 5, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], id) then
    local n = redis.call('HINCRBY', KEYS[3], id, 1)
    if n >= max_attempts then
      local due = string.match(id, '@(%d+)$')
      redis.call('HSET', KEYS[4], id, cjson.encode({timer = firing_key(id),
        due_ms = tonumber(due), attempts = n, error = ARGV[4], dead_ms = now}))
      redis.call('ZADD', KEYS[6], due, id)
      drop_claim(KEYS[1], KEYS[2], id)
      redis.call('HDEL', KEYS[3], id)
      redis.call('ZADD', KEYS[5], now, firing_key(id))
      dead = dead + 1
    else
      local backoff = math.min(tonumber(ARGV[3]), tonumber(ARGV[2]) * 2 ^ (n - 1))
      redis.call('ZADD', KEYS[1], 'XX', now + math.floor(backoff), id)
    end
  end
end
return dead
