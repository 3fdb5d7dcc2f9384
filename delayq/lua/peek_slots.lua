#!lua flags=no-writes,allow-cross-slot-keys
-- The next wake-up of each of many slots on one cluster node: the earliest due time in
-- its heads and the earliest lease end in its claims. Run on one node with every key it
-- reads passed in ARGV (slots of other nodes would be refused): one call instead of two
-- commands per slot. Loaded on its own (no prelude: the flags line must come first).
-- ARGV: per slot its heads key and its claims key.
-- Returns {i, ms, ...}: for each slot with something pending or claimed, its position
-- (1-based) in ARGV's pairs and its next wake-up in ms.
local out = {}
for i = 1, #ARGV / 2 do
  local wake = nil
  for _, key in ipairs({ARGV[2 * i - 1], ARGV[2 * i]}) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if #first > 0 and (wake == nil or tonumber(first[2]) < wake) then
      wake = tonumber(first[2])
    end
  end
  if wake ~= nil then
    out[#out + 1] = i
    out[#out + 1] = wake
  end
end
return out
