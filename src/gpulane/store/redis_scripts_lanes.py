"""The Redis store's Lua for lanes: a queue in claim order, queued tasks moved to another
lane's queue (a fallback), and the counts per queue that admission and the status view read
(redis_scripts.py holds the layout, the shared prelude and the counters).

A queue's score is (100 - effective priority) * 2**40 + seq, so a task moved at the same score
keeps its place by priority and age, and the longest-waiting task of a queue is the oldest of
its priority bands' heads: one range read per band (at most 101), never a walk of the queue.
"""

from __future__ import annotations

from gpulane.store.redis_scripts import PRELUDE

QUEUED = PRELUDE + r"""
-- ARGV[5..7]: preset lane limit. Answers up to limit queued tasks, in claim order, as
-- {id, device wish, created_at}: what a mover weighs, never the input.
local limit = tonumber(ARGV[7])
local out = {}
if limit < 1 then return out end
for _, id in ipairs(redis.call('ZRANGE', qkey(ARGV[6], ARGV[5]), 0, limit - 1)) do
  local h = redis.call('HMGET', P .. 't:' .. id, 'w', 'c')
  if h[1] then out[#out + 1] = {id, h[1], h[2]} end
end
return out
"""

MOVE = PRELUDE + r"""
-- ARGV[5..7]: lane reason nevents; then nevents (type, data) pairs; then task ids. Each task
-- still queued in another lane goes to `lane`'s queue at its score, with `reason` as its
-- fallback reason and the events appended (nothing else). Answers the moved tasks.
local lane, reason, ne = ARGV[5], ARGV[6], tonumber(ARGV[7])
local evs = {}
for j = 1, 2 * ne do evs[j] = ARGV[7 + j] end
local out = {}
for i = 8 + 2 * ne, #ARGV do
  local id = ARGV[i]
  local t = P .. 't:' .. id
  local h = redis.call('HMGET', t, 's', 'p', 'l', 'ep', 'seq')
  if h[1] == 'queued' and h[3] ~= lane then  -- a second mention finds it moved already
    local name, from = lane .. ':' .. h[2], h[3] .. ':' .. h[2]
    queued[from] = (queued[from] or 0) - 1
    queued[name] = (queued[name] or 0) + 1
    redis.call('ZREM', qkey(h[3], h[2]), id)
    redis.call('ZADD', qkey(lane, h[2]), score(h[4], h[5]), id)
    if not qseen[name] then
      qseen[name] = true
      redis.call('SADD', P .. 'queues', name)
    end
    redis.call('HSET', t, 'l', lane, 'fr', reason)
    xadd(id, evs)
    work[name] = true
    out[#out + 1] = hgetall(id)
  end
end
flush()
return out
"""

LANE_STATS = PRELUDE + r"""
-- Answers, per queue with queued or running tasks: preset lane queued running and the
-- created_at of its longest-waiting task ('' when none waits). A running set found empty
-- leaves `rlanes` (a claim puts it back). The queue's per-lane counter (what queue_stats
-- reads) is set to its length where they differ: a store made by an older release kept none.
local band = 1099511627776
local function oldest(q)
  local best, raw = nil, ''
  local lo = '-inf'
  while true do
    local got = redis.call('ZRANGEBYSCORE', q, lo, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    if #got == 0 then return raw end
    local c = redis.call('HGET', P .. 't:' .. got[1], 'c')
    if c and (best == nil or tonumber(c) < best) then best, raw = tonumber(c), c end
    lo = string.format('%.0f', (math.floor(tonumber(got[2]) / band) + 1) * band)
  end
end
local names = {}
for _, set in ipairs({'queues', 'rlanes'}) do
  for _, name in ipairs(redis.call('SMEMBERS', P .. set)) do names[name] = true end
end
local out = {}
for name in pairs(names) do
  local queued = redis.call('ZCARD', P .. 'q:' .. name)
  local running = redis.call('SCARD', P .. 'r:' .. name)
  if running == 0 then redis.call('SREM', P .. 'rlanes', name) end
  if tonumber(redis.call('HGET', P .. 'stats', 'l:' .. name) or '0') ~= queued then
    redis.call('HSET', P .. 'stats', 'l:' .. name, queued)
  end
  if queued > 0 or running > 0 then
    local lane, preset = string.match(name, '^([^:]*):(.*)$')
    local since = ''
    if queued > 0 then since = oldest(P .. 'q:' .. name) end
    out[#out + 1] = {preset, lane, queued, running, since}
  end
end
return out
"""
