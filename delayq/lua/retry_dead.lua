-- Re-queue dead-lettered firings to fire now: each goes back to the claims set with its
-- lease already run out, so the next claim takes it, for its original due time. A newer
-- schedule of the same timer is not touched (it fires at its own time).
-- KEYS: claims, claims per key, dead hash, attempts hash, dead index. ARGV: wake channel,
-- then dead letter fields (firing ids; timer keys for dead letters from before firing ids).
local now = now_ms()
local n = 0
for i = 2, #ARGV do
  local field = ARGV[i]
  local entry = redis.call('HGET', KEYS[3], field)
  if entry then
    local key, due = firing_key(field), nil
    if key then
      due = string.match(field, '@(%d+)$')
    else
      key, due = field, cjson.decode(entry).due_ms
    end
    local id = add_claim(KEYS[1], KEYS[2], key, due, now)
    if id then redis.call('HDEL', KEYS[4], id) end
    redis.call('HDEL', KEYS[3], field)
    redis.call('ZREM', KEYS[5], field)
    n = n + 1
  end
end
if n > 0 then redis.call('PUBLISH', ARGV[1], 0) end
return n
