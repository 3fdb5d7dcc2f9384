-- Schedule or move timers: each TTL key and its index entry are written together.
-- KEYS: heads, then per timer its timer key and its index shard.
-- ARGV: wake channel, then per timer a mode ('in' = delay ms, 'at' = epoch ms), a value
-- and its shard number. Returns the due time (epoch ms) of each timer.
-- A firing of the same timer already claimed is not touched: it completes, and this
-- schedule fires as well (the last schedule always fires).
local now = now_ms()
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local earliest = nil
local out = {}
for i = 1, (#KEYS - 1) / 2 do
  local key, shard = KEYS[2 * i], KEYS[2 * i + 1]
  local mode, value, shard_id = ARGV[3 * i - 1], tonumber(ARGV[3 * i]), ARGV[3 * i + 1]
  local due = value
  if mode == 'in' then due = now + value end
  if due > now then
    -- '1' is one of Redis's shared integers: the value costs no memory.
    redis.call('SET', key, '1', 'PXAT', due)
  else
    -- A key set in the past would only emit 'del'; the index alone fires it now.
    redis.call('DEL', key)
  end
  redis.call('ZADD', shard, due, key)
  refresh_head(KEYS[1], shard, shard_id)
  if earliest == nil or due < earliest then earliest = due end
  out[#out + 1] = due
end
if earliest ~= nil and (#head == 0 or earliest < tonumber(head[2])) then
  redis.call('PUBLISH', ARGV[1], earliest)
end
return out
