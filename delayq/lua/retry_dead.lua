-- Put dead-lettered timers back in the due index with their original due time (so they
-- fire at once), unless the same timer was scheduled again meanwhile.
-- KEYS: heads, dead hash. ARGV: wake channel, shard key prefix, then per
-- timer its key and its shard number.
local n = 0
for i = 3, #ARGV, 2 do
  local key, shard_id = ARGV[i], ARGV[i + 1]
  local entry = redis.call('HGET', KEYS[2], key)
  if entry then
    local due = cjson.decode(entry).due_ms
    local shard = ARGV[2] .. shard_id
    redis.call('ZADD', shard, 'NX', due, key)
    refresh_head(KEYS[1], shard, shard_id)
    redis.call('HDEL', KEYS[2], key)
    n = n + 1
  end
end
if n > 0 then redis.call('PUBLISH', ARGV[1], 0) end
return n
