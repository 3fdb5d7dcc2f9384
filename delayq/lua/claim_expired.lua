-- Claim timers named by 'expired' keyspace events. KEYS: heads, claims, claims per key,
-- recent set. ARGV: lease ms, shard key prefix, then per expired key the key and its
-- shard number. Returns {id1, id2, ...}: the firings this listener now owns.
local now = now_ms()
local lease_until = now + tonumber(ARGV[1])
local out = {}
for i = 3, #ARGV, 2 do
  local key, shard_id = ARGV[i], ARGV[i + 1]
  local shard = ARGV[2] .. shard_id
  local due = redis.call('ZSCORE', shard, key)
  local id = nil
  if due then
    -- Indexed: fire it if it is due (else it was moved later: the last schedule wins).
    if tonumber(due) <= now then
      redis.call('ZREM', shard, key)
      refresh_head(KEYS[1], shard, shard_id)
      id = add_claim(KEYS[2], KEYS[3], key, due, lease_until)
    end
  elseif redis.call('HEXISTS', KEYS[3], key) == 0 and not redis.call('ZSCORE', KEYS[4], key) then
    -- Not indexed, not being fired, not fired lately: a plain SETEX whose 'expire' event
    -- no listener heard. It is due now; from here on it is as durable as any timer.
    id = add_claim(KEYS[2], KEYS[3], key, now, lease_until)
  end
  if id then out[#out + 1] = id end
end
return out
