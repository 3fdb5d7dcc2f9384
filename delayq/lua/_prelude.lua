-- Shared by every script (prepended when scripts are loaded). The due index is many
-- small sorted sets ("shards"); `heads` holds each shard's earliest due time, so the
-- earliest timers overall are found without looking at every shard.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function refresh_head(heads, shard_key, shard_id)
  local head = redis.call('ZRANGE', shard_key, 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('ZREM', heads, shard_id)
  else
    redis.call('ZADD', heads, head[2], shard_id)
  end
end
