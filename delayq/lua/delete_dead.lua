-- Delete dead letters for good (the operator chose not to re-queue them): each leaves the
-- dead-letter hash, its index and the attempts hash. Fields that are gone already are
-- left alone. KEYS: dead hash, dead index, attempts hash. ARGV: dead letter fields (firing
-- ids; timer keys for dead letters from before firing ids). Returns the number deleted.
local n = 0
for i = 1, #ARGV do
  n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
end
return n
