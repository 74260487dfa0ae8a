"""The Lua scripts that keep an entry's index, LRU place and budget share consistent.

Each runs atomically on the server, so servers sharing the store never see an
entry half published, count its bytes twice, or evict it twice. All take
``KEYS[1]`` = the hash-tagged base ``{prefix}`` and touch only keys under it (one
cluster slot; key names are built from it in the script, as
:mod:`kv3d_tier_redis.layout` lays them out). Chunks are not touched here: the
client writes them before publishing and deletes them after a script returns the
manifests it unlinked.

The scripts that publish or remove an entry also announce it on the feed stream
``{prefix}:feed`` (``XADD ... MAXLEN ~ feed_len``; fields ``n``: a store-wide
sequence number from ``{prefix}:feedn``, ``op``: ``put`` or ``del``, ``m``: the
member, ``src``: the writing server's id), in the same atomic step, so a server
following it (:mod:`kv3d_tier_redis.feed`) never sees an entry before it is
published, and a gap in ``n`` tells it that it missed some. ``feed_len`` 0: no feed.
"""

from __future__ import annotations

PRELUDE = r"""
local base = KEYS[1]
local LRU, SIZE, BYTES, CLOCK = base .. ':lru', base .. ':size', base .. ':bytes', base .. ':clock'
local FEED, FEEDN = base .. ':feed', base .. ':feedn'

-- announce op ('put' | 'del') of member m by server src on the feed, kept to about keep entries
local function announce(op, m, src, keep)
  keep = tonumber(keep)
  if not keep or keep <= 0 then return end
  local n = redis.call('INCR', FEEDN)
  redis.call('XADD', FEED, 'MAXLEN', '~', keep, '*', 'n', n, 'op', op, 'm', m, 'src', src)
end

-- remove member m from the index, the LRU order and the budget; its manifest (or false)
local function unlink(m)
  local mk = base .. ':m:' .. m
  local man = redis.call('GET', mk)
  local sz = redis.call('HGET', SIZE, m)
  if sz then redis.call('DECRBY', BYTES, sz) end
  redis.call('HDEL', SIZE, m)
  redis.call('ZREM', LRU, m)
  redis.call('DEL', mk)
  local f, k = string.match(m, '^([0-9a-f]+):[0-9a-f]+:([0-9a-f]+)$')
  if f then
    local w = base .. ':w:' .. f
    if redis.call('HGET', w, k) == m then redis.call('HDEL', w, k) end
  end
  return man
end

-- evict least recently used members (never keep) until the budget holds: {member, manifest, ...}
local function make_room(cap, keep, out, src, feedlen)
  while tonumber(redis.call('GET', BYTES) or '0') > cap do
    local oldest = redis.call('ZRANGE', LRU, 0, 1)
    local victim = oldest[1]
    if victim == keep then victim = oldest[2] end
    if not victim then break end
    local man = unlink(victim)
    announce('del', victim, src, feedlen)
    if man then
      table.insert(out, victim)
      table.insert(out, man)
    end
  end
  return out
end
"""

PUBLISH = PRELUDE + r"""
-- ARGV: fp, member, key, manifest, size, ttl_ms, capacity, src, feed_len
-- returns {old member or '', old manifest or '', victim, manifest, victim, manifest, ...}
local fp, member, key = ARGV[1], ARGV[2], ARGV[3]
local size, ttl, cap = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local where = base .. ':w:' .. fp
local old = redis.call('HGET', where, key)
local oldman = false
if old then oldman = unlink(old) end
local out = {old or '', oldman or ''}
local mk = base .. ':m:' .. member
if ttl > 0 then
  redis.call('SET', mk, ARGV[4], 'PX', ttl)
else
  redis.call('SET', mk, ARGV[4])
end
redis.call('HSET', where, key, member)
redis.call('HSET', SIZE, member, size)
redis.call('INCRBY', BYTES, size)
redis.call('ZADD', LRU, redis.call('INCR', CLOCK), member)
announce('put', member, ARGV[8], ARGV[9])
return make_room(cap, member, out, ARGV[8], ARGV[9])
"""

LOOKUP = PRELUDE + r"""
-- ARGV: fp, key, ttl_ms, refresh (1: a use -- most recent in the LRU order, TTL renewed)
-- returns {member, manifest} or false; an expired manifest is unlinked (a plain miss)
local m = redis.call('HGET', base .. ':w:' .. ARGV[1], ARGV[2])
if not m then return false end
local mk = base .. ':m:' .. m
local man = redis.call('GET', mk)
if not man then
  unlink(m)
  return false
end
if ARGV[4] == '1' then
  redis.call('ZADD', LRU, 'XX', redis.call('INCR', CLOCK), m)
  local ttl = tonumber(ARGV[3])
  if ttl > 0 then redis.call('PEXPIRE', mk, ttl) end
end
return {m, man}
"""

REMOVE = PRELUDE + r"""
-- ARGV: fp, key, src, feed_len, [member, [wid]]: remove the entry (only if it is still that member,
-- and that member's put of that wid, when given; wid '' = any). Returns {member, manifest} of what
-- was removed, or false.
local w = base .. ':w:' .. ARGV[1]
local m = redis.call('HGET', w, ARGV[2])
if not m then return false end
if ARGV[5] then
  if m ~= ARGV[5] then return false end
  local man = redis.call('GET', base .. ':m:' .. m)
  if man and ARGV[6] and ARGV[6] ~= '' and string.sub(man, 9, 24) ~= ARGV[6] then return false end
end
local man = unlink(m)
announce('del', m, ARGV[3], ARGV[4])
return {m, man or ''}
"""

TRIM = PRELUDE + r"""
-- ARGV: capacity, src, feed_len. Evicts down to it: {victim, manifest, ...}
return make_room(tonumber(ARGV[1]), false, {}, ARGV[2], ARGV[3])
"""

FORGET = PRELUDE + r"""
-- ARGV: member, ...: unlink members whose manifests expired (entries() found them gone)
for i = 1, #ARGV do
  if redis.call('EXISTS', base .. ':m:' .. ARGV[i]) == 0 then
    unlink(ARGV[i])
  end
end
return #ARGV
"""
