-- The clock of every script: Redis's own, the one that expires TTL keys, so due times
-- and TTLs agree and hosts' clocks never matter. (Tests swap this file for a clock they
-- move by hand; nothing else in the scripts changes.)
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function now_ms()
  return math.floor(now_us() / 1000)
end
