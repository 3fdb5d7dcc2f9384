#!lua flags=no-writes,allow-cross-slot-keys
-- How many timers a chunk of the due index's shards holds, for `delayq status`, /metrics
-- and the dashboard: one call per chunk instead of one ZCARD per shard, so the process
-- that reads it (the listener serving /metrics) parses one number instead of thousands.
-- Loaded on its own (no prelude: the flags line must come first).
-- ARGV: the shards' keys. Returns their total size.
local n = 0
for i = 1, #ARGV do
  n = n + redis.call('ZCARD', ARGV[i])
end
return n
