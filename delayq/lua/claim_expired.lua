-- Claim timers named by 'expired' keyspace events. KEYS: heads, in-flight set,
-- in-flight due hash, recent set. ARGV: lease ms, shard key prefix, then
-- per expired key the key and its shard number.
-- Returns {key1, due1, ...} for the timers this listener now owns.
local now = now_ms()
local lease_until = now + tonumber(ARGV[1])
local out = {}
for i = 3, #ARGV, 2 do
  local key, shard_id = ARGV[i], ARGV[i + 1]
  local shard = ARGV[2] .. shard_id
  if not redis.call('ZSCORE', KEYS[2], key) and not redis.call('ZSCORE', KEYS[4], key) then
    local due = redis.call('ZSCORE', shard, key)
    if due == false then
      -- No index entry: a plain SETEX from a producer that does not use delayq.
      -- It is due now; from here on it is as durable as any other timer.
      due = now
    elseif tonumber(due) > now then
      due = nil  -- moved to a later time since: the last schedule wins
    else
      redis.call('ZREM', shard, key)
      refresh_head(KEYS[1], shard, shard_id)
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
