-- Extend the leases of firings a listener is still working on (an external call queued or
-- under way), so that no other listener takes them over meanwhile. Only firings still
-- claimed are touched: one acknowledged or dead-lettered elsewhere stays gone.
-- KEYS: claims. ARGV: lease ms, then firing ids. Returns the number renewed.
local lease_until = now_ms() + tonumber(ARGV[1])
local n = 0
for i = 2, #ARGV do
  n = n + redis.call('ZADD', KEYS[1], 'XX', 'CH', lease_until, ARGV[i])
end
return n
