-- Schedule or move timers: each TTL key and its index entry are written together.
-- KEYS: due index, then one timer key per timer.
-- ARGV: wake channel, then per timer a mode ('in' = delay ms, 'at' = epoch ms) and a value.
-- Returns the due time (epoch ms) of each timer. Due times come from Redis's clock, the
-- same clock that expires the key, so the index and the TTL agree to the millisecond.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local earliest = nil
local out = {}
for i = 2, #KEYS do
  local key = KEYS[i]
  local due = tonumber(ARGV[2 * i - 1])
  if ARGV[2 * i - 2] == 'in' then due = now + due end
  if due > now then
    -- '1' is one of Redis's shared integers: the value costs no memory.
    redis.call('SET', key, '1', 'PXAT', due)
  else
    -- A key set in the past would only emit 'del'; the index alone fires it now.
    redis.call('DEL', key)
  end
  redis.call('ZADD', KEYS[1], due, key)
  if earliest == nil or due < earliest then earliest = due end
  out[#out + 1] = due
end
if earliest ~= nil and (#head == 0 or earliest < tonumber(head[2])) then
  redis.call('PUBLISH', ARGV[1], earliest)
end
return out
