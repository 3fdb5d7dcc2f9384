-- Schedule or move timers: each TTL key and its index entry are written together.
-- KEYS: heads, then per timer its timer key and its index shard under the default shard
-- count (shard prefix, number). ARGV: wake channel, the length of the shard prefix, the
-- layout key, the default shard count, then per timer its due time: epoch ms ('at'), or
-- '+' and a delay in ms ('in'); and its hash (delayq.keys.key_hash). Returns the due time
-- (epoch ms) of each timer.
-- A firing of the same timer already claimed is not touched: it completes, and this
-- schedule fires as well (the last schedule always fires).
local now = now_ms()
local heads = KEYS[1]
local head = redis.call('ZRANGE', heads, 0, 0, 'WITHSCORES')
local skip = tonumber(ARGV[2]) + 1
-- Once the index was resized (delayq/layout.py), a timer's shard is its hash modulo the
-- count Redis holds, and its entry may still be in its shard of the count before.
local n, p = read_layout(ARGV[3], ARGV[4])
local resized = n ~= tonumber(ARGV[4]) or p ~= n
local earliest = nil
local out = {}
-- `heads` is brought up to date once per call, not per timer: a shard that only gained
-- entries keeps the earlier of its head and theirs (one ZADD LT for all of them); a
-- shard where a timer moved (perhaps its head, perhaps later) is read again at the end.
local gained, moved, seen = {}, {}, {}
for i = 1, (#KEYS - 1) / 2 do
  local key, shard, when = KEYS[2 * i], KEYS[2 * i + 1], ARGV[2 * i + 3]
  local before = nil
  if resized then
    local prefix, ids = string.sub(shard, 1, skip - 1), shard_ids(ARGV[2 * i + 4], n, p)
    shard = prefix .. ids[1]
    if ids[2] then before = prefix .. ids[2] end
  end
  local due = tonumber(when)
  if string.byte(when) == 43 then -- '+': a delay
    due = now + due
    -- Handed to Redis as text: it would format a number with '%.17g' at every call.
    when = string.format('%d', due)
  end
  if due > now then
    -- '1' is one of Redis's shared integers: the value costs no memory.
    redis.call('SET', key, '1', 'PXAT', when)
  else
    -- A key set in the past would only emit 'del'; the index alone fires it now.
    redis.call('DEL', key)
  end
  if redis.call('ZADD', shard, when, key) == 1 then
    gained[#gained + 1] = when
    gained[#gained + 1] = string.sub(shard, skip)
  elseif not seen[shard] then
    seen[shard] = true
    moved[#moved + 1] = shard
  end
  if before and redis.call('ZREM', before, key) == 1 and not seen[before] then
    seen[before] = true
    moved[#moved + 1] = before
  end
  if earliest == nil or due < earliest then earliest = due end
  out[i] = due
end
-- In slices: unpack() is bounded by Lua's C stack.
for first = 1, #gained, 1000 do
  redis.call('ZADD', heads, 'LT', unpack(gained, first, math.min(first + 999, #gained)))
end
for _, shard in ipairs(moved) do
  refresh_head(heads, shard, string.sub(shard, skip))
end
if earliest ~= nil and (#head == 0 or earliest < tonumber(head[2])) then
  redis.call('PUBLISH', ARGV[1], earliest)
end
return out
