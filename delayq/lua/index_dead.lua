-- Bring the dead-letter index in line with the dead-letter hash for the fields named:
-- index a dead letter written before the index existed (or by a listener of an older
-- version), drop an index entry whose dead letter is gone. Called in bounded chunks.
-- KEYS: dead hash, dead index. ARGV: dead letter fields. Returns the number indexed.
local n = 0
for i = 1, #ARGV do
  local entry = redis.call('HGET', KEYS[1], ARGV[i])
  if entry then
    n = n + redis.call('ZADD', KEYS[2], dead_due(ARGV[i], entry), ARGV[i])
  else
    redis.call('ZREM', KEYS[2], ARGV[i])
  end
end
return n
