-- Give claimed timers back (graceful stop): their lease ends now, so any listener, this
-- one after a restart included, claims them at once. KEYS: in-flight set. ARGV: keys.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now, ARGV[i])
end
return #ARGV
