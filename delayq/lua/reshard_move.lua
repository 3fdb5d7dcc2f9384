-- One step of a resize of the due index (delayq/layout.py): move entries of one shard to
-- the shards the layout puts them in now. Atomic, so a schedule, cancel or claim of the
-- same timers runs wholly before or after it; an entry that left the shard since the
-- caller read it (fired, cancelled, moved) is skipped.
-- KEYS: heads, layout. ARGV: shard key prefix, the shard's id, the shard count of the
-- resize, then per entry its timer key and its hash. Returns how many entries moved.
local n = read_layout(KEYS[2], 0)
if n ~= tonumber(ARGV[3]) then
  return redis.error_reply('LAYOUT the shard count is ' .. n .. ', not ' .. ARGV[3])
end
local src_id = ARGV[2]
local src = ARGV[1] .. src_id
local moved = 0
for i = 4, #ARGV, 2 do
  local key = ARGV[i]
  local dest_id = string.format('%d', tonumber(ARGV[i + 1]) % n)
  local due = redis.call('ZSCORE', src, key)
  if due and dest_id ~= src_id then
    redis.call('ZREM', src, key)
    local dest = ARGV[1] .. dest_id
    -- In both shards only if a producer of 0.2 wrote the old one after the resize began:
    -- the earlier due time stays (a claim re-arms it if its TTL key says later).
    redis.call('ZADD', dest, 'LT', due, key)
    refresh_head(KEYS[1], dest, dest_id)
    moved = moved + 1
  end
end
refresh_head(KEYS[1], src, src_id)
return moved
