-- Claim timers named by 'expired' keyspace events. KEYS: due index, in-flight set,
-- in-flight due hash, recent set.  ARGV: lease ms, then the expired keys.
-- Returns {key1, due1, ...} for the timers this listener now owns.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_until = now + tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local key = ARGV[i]
  if not redis.call('ZSCORE', KEYS[2], key) and not redis.call('ZSCORE', KEYS[4], key) then
    local due = redis.call('ZSCORE', KEYS[1], key)
    if due == false then
      -- No index entry: a plain SETEX from a producer that does not use delayq.
      -- It is due now; from here on it is as durable as any other timer.
      due = now
    elseif tonumber(due) > now then
      due = nil  -- moved to a later time since: the last schedule wins
    else
      redis.call('ZREM', KEYS[1], key)
    end
    if due then
      redis.call('ZADD', KEYS[2], lease_until, key)
      redis.call('HSET', KEYS[3], key, due)
      out[#out + 1] = key
      out[#out + 1] = due
    end
  end
end
return out
