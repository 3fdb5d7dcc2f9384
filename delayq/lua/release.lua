-- Give claimed firings back (graceful stop): their lease ends now, so any listener, this
-- one after a restart included, claims them at once. Firings no longer claimed are left
-- alone. KEYS: claims. ARGV: firing ids.
local now = now_ms()
for i = 1, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now, ARGV[i])
end
return #ARGV
