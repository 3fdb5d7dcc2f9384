-- Bring what delayq copy-timers read from another Redis into one partition.
-- * Claimed firings go into the claims set with the lease they had there, so that a
--   listener takes each over when that lease ends, as it takes over a firing whose
--   listener stopped (a reclaimed firing: its outcome is looked for first). One claimed
--   here already is left alone.
-- * Dead letters are added unless the partition has one under the same field.
-- * What was copied is remembered in the `copied` hash (markers the caller names), which
--   is kept for ARGV[2] seconds after the last copy: a later run does not bring back what
--   this partition has since fired, cancelled or moved.
-- Listeners already running hear of the firings on the partition's wake channel.
-- KEYS: claims, claims per key, attempts hash, dead letters, copied hash, dead index.
-- ARGV: wake channel, seconds to keep the copied hash, number of firings, number of dead
-- letters, then per firing its id, lease deadline (ms) and failed attempts, per dead
-- letter its field and JSON entry, then the markers to remember.
-- Returns {firings added, dead letters added}.
local n_claims, n_dead = tonumber(ARGV[3]), tonumber(ARGV[4])
local claims, dead = 0, 0
local earliest = nil
local i = 5
for _ = 1, n_claims do
  local id, lease, attempts = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  local key, due = firing_key(id), string.match(id, '@(%d+)$')
  if key and add_claim(KEYS[1], KEYS[2], key, due, lease) then
    if attempts > 0 then redis.call('HSETNX', KEYS[3], id, attempts) end
    claims = claims + 1
    if earliest == nil or tonumber(lease) < earliest then earliest = tonumber(lease) end
  end
end
for _ = 1, n_dead do
  if redis.call('HSETNX', KEYS[4], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('ZADD', KEYS[6], dead_due(ARGV[i], ARGV[i + 1]), ARGV[i])
    dead = dead + 1
  end
  i = i + 2
end
if i <= #ARGV then
  for j = i, #ARGV do redis.call('HSET', KEYS[5], ARGV[j], 1) end
  redis.call('EXPIRE', KEYS[5], ARGV[2])
end
if earliest ~= nil then redis.call('PUBLISH', ARGV[1], earliest) end
return {claims, dead}
