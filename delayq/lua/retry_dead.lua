-- Put dead-lettered timers back in the due index with their original due time (so they
-- fire at once), unless the same timer was scheduled again meanwhile.
-- KEYS: due index, dead hash.  ARGV: wake channel, then timer keys (none: all of them).
local keys = {}
if #ARGV > 1 then
  for i = 2, #ARGV do keys[#keys + 1] = ARGV[i] end
else
  keys = redis.call('HKEYS', KEYS[2])
end
local n = 0
for _, key in ipairs(keys) do
  local entry = redis.call('HGET', KEYS[2], key)
  if entry then
    local due = cjson.decode(entry).due_ms
    redis.call('ZADD', KEYS[1], 'NX', due, key)
    redis.call('HDEL', KEYS[2], key)
    n = n + 1
  end
end
if n > 0 then redis.call('PUBLISH', ARGV[1], 0) end
return n
