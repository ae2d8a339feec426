"""The Redis store's Lua for upkeep: heartbeats, takeovers of lost attempts, a restarted
node's recovery, listings and retention (redis_scripts.py holds the layout, the shared
prelude and a task's own lifecycle)."""

from __future__ import annotations

from gpulane.store.redis_scripts import PRELUDE

TAKE_BACK = PRELUDE + r"""
-- ARGV[5]: count; each item: id token fail(1/0) error stateevent. Spent takeovers.
local out = {}
local i = 6
for s = 1, tonumber(ARGV[5]) do
  local id, token, err, ev = ARGV[i], ARGV[i + 1], ARGV[i + 3], ARGV[i + 4]
  if ARGV[i + 2] == '1' then
    out[s] = finish(id, token, 'failed', 'null', err, {'state', ev})
  else
    out[s] = requeue(id, token, err, '1', {'state', ev})
  end
  i = i + 5
end
flush()
return out
"""

RUNNING = PRELUDE + r"""
-- ARGV[5]: 'stale' (ARGV[6]: heartbeat cutoff) or 'node' (ARGV[6]: node). Answers rows of
-- id token attempts preset node heartbeat.
local ids
if ARGV[5] == 'stale' then
  ids = redis.call('ZRANGEBYSCORE', P .. 'running', '-inf', '(' .. ARGV[6], 'LIMIT', 0, 1000)
else
  ids = redis.call('SMEMBERS', P .. 'n:' .. ARGV[6])
end
local out = {}
for _, id in ipairs(ids) do
  local h = redis.call('HMGET', P .. 't:' .. id, 'tk', 'a', 'p', 'n', 's')
  if h[5] == 'running' then
    out[#out + 1] = {id, h[1], h[2], h[3], h[4],
                     redis.call('ZSCORE', P .. 'running', id) or '0'}
  end
end
return out
"""

HEARTBEAT = PRELUDE + r"""
-- ARGV[5]: node; ARGV[6..]: id, token pairs. Answers the indexes (1-based) held in vain.
local node = ARGV[5]
local lost = {}
for i = 6, #ARGV, 2 do
  local h = redis.call('HMGET', P .. 't:' .. ARGV[i], 's', 'tk', 'n')
  if h[1] == 'running' and h[2] == ARGV[i + 1] and h[3] == node then
    redis.call('ZADD', P .. 'running', 'XX', now, ARGV[i])
  else
    lost[#lost + 1] = (i - 4) / 2
  end
end
return lost
"""

RECOVER = PRELUDE + r"""
-- ARGV[5]: node. Requeue what it left running, the attempt given back. Answers how many.
local node = ARGV[5]
local ev = cjson.encode({state = 'queued', reason = 'node restarted'})
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', P .. 'n:' .. node)) do
  local t = P .. 't:' .. id
  local h = redis.call('HMGET', t, 's', 'p', 'l', 'ep', 'seq', 'a')
  if h[1] == 'running' then
    xadd(id, {'state', ev})
    redis.call('HSET', t, 's', 'queued')
    redis.call('HDEL', t, 'n', 'd')
    if tonumber(h[6]) > 0 then redis.call('HINCRBY', t, 'a', -1) end
    leave_running(id, node, h[3], h[2])
    enqueue(id, h[2], h[3], h[4], h[5])
    work[h[3] .. ':' .. h[2]] = true
    n = n + 1
  else
    redis.call('SREM', P .. 'n:' .. node, id)
  end
end
left[node] = left[node] or {}
flush()
return n
"""

PAGE = PRELUDE + r"""
-- ARGV[5..10]: index key, below (seq, exclusive; '+inf' for the first page), limit + 1, state
-- filter, preset filter ('' for none), most entries to look at. Answers up to limit + 1
-- tasks, newest first, then the seq the scan stopped below when it looked at that many ('' if
-- it did not): a filter few tasks pass must not hold the server for a scan of every task.
local index, want, state, preset = P .. ARGV[5], tonumber(ARGV[7]), ARGV[8], ARGV[9]
local below, budget = ARGV[6], tonumber(ARGV[10])
local out = {}
local stopped = ''
while #out < want and stopped == '' do
  local ids = redis.call('ZREVRANGEBYSCORE', index, below, '-inf', 'WITHSCORES', 'LIMIT', 0, 200)
  if #ids == 0 then break end
  for i = 1, #ids, 2 do
    local sp = redis.call('HMGET', P .. 't:' .. ids[i], 's', 'p')
    if not sp[1] then
      redis.call('ZREM', index, ids[i])  -- expired under its TTL: prune the entry
    elseif (state == '' or sp[1] == state) and (preset == '' or sp[2] == preset) then
      out[#out + 1] = hgetall(ids[i])
      if #out >= want then break end
    end
    below = '(' .. ids[i + 1]
    budget = budget - 1
    if budget <= 0 then
      stopped = ids[i + 1]
      break
    end
  end
end
out[#out + 1] = stopped
return out
"""

PURGE = PRELUDE + r"""
-- ARGV[5..6]: cutoff (finished before), batch. Deletes one batch of finished tasks, their
-- streams and keys, and their listing entries. Answers found, tasks, events, keys.
local members = redis.call('ZRANGEBYSCORE', P .. 'done', '-inf', '(' .. ARGV[5],
                           'LIMIT', 0, tonumber(ARGV[6]))
local tasks, events, keys = 0, 0, 0
for _, m in ipairs(members) do
  local id, preset = string.sub(m, 1, 24), string.sub(m, 25)
  local t = P .. 't:' .. id
  local h = redis.call('HMGET', t, 's', 'k')
  if h[1] then
    local n = redis.call('XLEN', P .. 'e:' .. id)
    events = events + n
    redis.call('HINCRBY', P .. 'stats', 'events', -n)
    redis.call('DEL', t, P .. 'e:' .. id)
    tasks = tasks + 1
    if h[2] then
      local k = P .. 'k:' .. h[2]
      local v = redis.call('GET', k)
      if v and string.sub(v, -24) == id then
        redis.call('DEL', k)
        redis.call('HINCRBY', P .. 'stats', 'keys', -1)
        keys = keys + 1
      end
    end
  end
  -- Gone either way now (deleted here, or expired under its TTL): drop every index entry.
  redis.call('ZREM', P .. 'done', m)
  redis.call('ZREM', P .. 'all', id)
  redis.call('ZREM', P .. 'p:' .. preset, id)
  redis.call('ZREM', P .. 's:failed', id)
  redis.call('ZREM', P .. 's:cancelled', id)
end
return {#members, tasks, events, keys}
"""

COUNTS = PRELUDE + r"""
local s = redis.call('HMGET', P .. 'stats', 'events', 'keys')
return {redis.call('ZCARD', P .. 'all'), tonumber(s[1] or '0'), tonumber(s[2] or '0')}
"""
