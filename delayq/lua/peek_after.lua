#!lua flags=no-writes,allow-cross-slot-keys
-- For the dashboard's lists (delayq/browse.py): the first entry of each of many sorted
-- sets from a score on. One call reads a chunk of index shards (or, on a cluster node, of
-- its slots' sets, all passed in ARGV) instead of one command each. Members tied with the
-- cursor's score are left to the caller (Lua compares strings by the server's locale;
-- Redis orders members bytewise).
-- Loaded on its own (no prelude: the flags line must come first).
-- ARGV[1]: the lowest score wanted ('-inf' or a score, inclusive); then the sorted sets.
-- Returns {i, member, score, ...} for each set (its 1-based position among the sets)
-- with an entry at or above ARGV[1].
local out = {}
for i = 2, #ARGV do
  local first = redis.call('ZRANGEBYSCORE', ARGV[i], ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #first > 0 then
    out[#out + 1] = i - 1
    out[#out + 1] = first[1]
    out[#out + 1] = first[2]
  end
end
return out
