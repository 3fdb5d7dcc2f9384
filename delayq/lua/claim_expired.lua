-- Claim timers named by 'expired' keyspace events. KEYS: heads, claims, claims per key,
-- recent set. ARGV: lease ms, shard key prefix, layout key, default shard count, then per
-- expired key the key and its hash. Returns {id1, id2, ...}: the firings this listener
-- now owns.
local now = now_ms()
local lease_until = now + tonumber(ARGV[1])
local n, p = read_layout(ARGV[3], ARGV[4])
local out = {}
for i = 5, #ARGV, 2 do
  local key = ARGV[i]
  local ids = shard_ids(ARGV[i + 1], n, p)
  local _, due = find_entry(ARGV[2], ids, key)
  local id = nil
  if due then
    -- Indexed: fire it if it is due (else it was moved later: the last schedule wins).
    if tonumber(due) <= now then
      unindex(KEYS[1], ARGV[2], ids, key)
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
