"""The Redis store's Lua: one script per store method, each one atomic on the server.

Every script is ``PRELUDE`` (the key layout and the steps several methods share) followed by
its own body, and is called with EVALSHA (redis_conn.py loads it again after a server
restart). A task's own lifecycle is here; heartbeats, takeovers, recovery, listings and
retention are in redis_scripts_upkeep.py. Keys are not declared in KEYS: the store runs on
one Redis server (or a primary), never on a cluster. Numbers that must come back exact
(timestamps) travel as strings: Lua hands a number back to Redis as an integer.

Key layout (prefix ``gl:``):

- ``t:<id>`` hash, one task: id seq p(reset) s(tate) in out err bp (base priority) ep
  (effective priority) w(ish) l(ane) to (timeout) ct fr k (idempotency key) by c(reated)
  st(arted) f(inished) a(ttempts) tk (token) n(ode) d(evice) ev (events numbered so far).
- ``e:<id>`` stream, its events; entry id ``<event number>-0``, fields t (type), d (JSON), ts.
- ``k:<key>`` string, an idempotency key: ``<body hash> <task id>``.
- ``q:<lane>:<preset>`` sorted set, a queue: score (100 - effective priority) * 2**40 + seq.
- ``queues`` set of ``<lane>:<preset>``: the queues that may hold tasks (ageing walks them).
- ``all``, ``p:<preset>``, ``s:<state>`` (queued, running, failed, cancelled) sorted sets by
  seq: the listings; ``done`` sorted set of ``<id><preset>`` by finish time: retention.
- ``running`` sorted set by last heartbeat; ``n:<node>`` set of a node's running tasks;
  ``nodes`` set of the nodes holding at least one; ``r:<lane>:<preset>`` set of a queue's
  running tasks (every node), ``rlanes`` set of ``<lane>:<preset>`` whose set may hold some
  (the status view counts them: redis_scripts_lanes.py).
- ``stats`` hash: ``q:<preset>`` queued now, ``l:<lane>:<preset>`` queued now in that lane,
  ``c:<preset>`` claims ever, ``events``, ``keys``.
- channel ``ch``: ``f<TAB>instance<TAB>id id ...`` (tasks that ended),
  ``w<TAB>instance<TAB>lane:preset<LF>lane:preset ...`` (queues that were empty and got work,
  or that work was put back in or moved to).
"""

from __future__ import annotations

PREFIX = "gl:"
"""Every key and the channel start with it."""

CHANNEL = PREFIX + "ch"
"""Where the scripts publish final transitions and new work, for the other stores."""

PRELUDE = r"""
local P = 'gl:'
local inst = ARGV[1]
local now = ARGV[2]
local evmax = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
-- What this call changed, applied once at its end by flush(): counters (queued: per
-- '<lane>:<preset>'), and what to publish.
local finals = {}
local work = {}
local added = 0
local queued = {}
local qseen = {}
local left = {}
local done = {}

local function qkey(lane, preset) return P .. 'q:' .. lane .. ':' .. preset end
local function score(prio, seq) return (100 - tonumber(prio)) * 1099511627776 + tonumber(seq) end

local function hgetall(id) return redis.call('HGETALL', P .. 't:' .. id) end

-- Write events (pairs of type, JSON data) to a task's stream numbered from `first`; the
-- caller has set the task's counter `ev` to the last number already.
local function xadd_from(id, evs, first)
  local n = #evs / 2
  local e = P .. 'e:' .. id
  for i = 1, n do
    redis.call('XADD', e, (first + i - 1) .. '-0', 't', evs[2 * i - 1], 'd', evs[2 * i],
               'ts', now)
  end
  added = added + n
  if first + n - 1 > evmax then added = added - redis.call('XTRIM', e, 'MAXLEN', evmax) end
end

-- Append events, numbered by the task's counter. Answers the last number.
local function xadd(id, evs)
  local n = #evs / 2
  if n == 0 then return 0 end
  local last = redis.call('HINCRBY', P .. 't:' .. id, 'ev', n)
  xadd_from(id, evs, last - n + 1)
  return last
end

local function enqueue(id, preset, lane, prio, seq)
  local q = qkey(lane, preset)
  if not qseen[q] then
    qseen[q] = true
    -- Other nodes hear of a queue that was empty: one that was not keeps them busy already.
    if redis.call('ZCARD', q) == 0 then work[lane .. ':' .. preset] = true end
    redis.call('SADD', P .. 'queues', lane .. ':' .. preset)
  end
  if redis.call('ZADD', q, score(prio, seq), id) == 1 then
    redis.call('ZADD', P .. 's:queued', seq, id)
    local name = lane .. ':' .. preset
    queued[name] = (queued[name] or 0) + 1
  end
end

-- Many members of one key at once, in chunks (Lua's unpack takes a few thousand at most).
local function bulk(cmd, key, items)
  for i = 1, #items, 1000 do
    redis.call(cmd, key, unpack(items, i, math.min(i + 999, #items)))
  end
end

-- No longer running: the running indexes drop it at flush(), in one call per index.
local stopped = {}
local unran = {}
local function leave_running(id, node, lane, preset)
  stopped[#stopped + 1] = id
  if node then
    left[node] = left[node] or {}
    left[node][#left[node] + 1] = id
  end
  if lane and preset then
    local r = P .. 'r:' .. lane .. ':' .. preset
    unran[r] = unran[r] or {}
    unran[r][#unran[r] + 1] = id
  end
end

-- A task reached a final state: index it for listings and retention, and let its keys expire
-- (the purge normally deletes them first; the TTL is the backstop when no node purges).
local function ended(id, state, preset, seq, key)
  if state == 'failed' or state == 'cancelled' then
    redis.call('ZADD', P .. 's:' .. state, seq, id)
  end
  done[#done + 1] = now
  done[#done + 1] = id .. preset
  redis.call('EXPIRE', P .. 't:' .. id, ttl)
  redis.call('EXPIRE', P .. 'e:' .. id, ttl)
  if key then
    local k = P .. 'k:' .. key
    local v = redis.call('GET', k)
    if v and string.sub(v, -24) == id then redis.call('EXPIRE', k, ttl) end
  end
  finals[#finals + 1] = id
end

-- End the running attempt holding `token`: {'ok', task} or {'stale', state, token} or
-- {'missing'}. evs: its events, the final state event last.
local function finish(id, token, state, output, err, evs)
  local t = P .. 't:' .. id
  local cur = redis.call('HMGET', t, 's', 'tk', 'p', 'n', 'seq', 'k', 'ev', 'err', 'l')
  if not cur[1] then return {'missing'} end
  if cur[1] ~= 'running' or cur[2] ~= token then return {'stale', cur[1], cur[2]} end
  local first = tonumber(cur[7]) + 1
  local last = first + #evs / 2 - 1
  if err ~= '' then
    redis.call('HSET', t, 's', state, 'out', output, 'f', now, 'ev', last, 'err', err)
  else
    redis.call('HSET', t, 's', state, 'out', output, 'f', now, 'ev', last)
    if cur[8] then redis.call('HDEL', t, 'err') end
  end
  xadd_from(id, evs, first)
  leave_running(id, cur[4], cur[9], cur[3])
  ended(id, state, cur[3], cur[5], cur[6])
  return {'ok', hgetall(id)}
end

-- Put the running attempt holding `token` back in its queue, or in `lane`'s ('' for its own)
-- with `reason` as its fallback reason ('' to keep it); spent = '1' keeps the attempt
-- counted. Same answers as finish.
local function requeue(id, token, err, spent, evs, lane, reason)
  local t = P .. 't:' .. id
  local cur = redis.call('HMGET', t, 's', 'tk', 'p', 'n', 'seq', 'l', 'ep')
  if not cur[1] then return {'missing'} end
  if cur[1] ~= 'running' or cur[2] ~= token then return {'stale', cur[1], cur[2]} end
  xadd(id, evs)
  redis.call('HSET', t, 's', 'queued')
  if err ~= '' then redis.call('HSET', t, 'err', err) else redis.call('HDEL', t, 'err') end
  redis.call('HDEL', t, 'n', 'd')
  if spent ~= '1' then redis.call('HINCRBY', t, 'a', -1) end
  leave_running(id, cur[4], cur[6], cur[3])
  local to = cur[6]
  if lane and lane ~= '' then
    to = lane
    redis.call('HSET', t, 'l', lane)
  end
  if reason and reason ~= '' then redis.call('HSET', t, 'fr', reason) end
  enqueue(id, cur[3], to, cur[7], cur[5])
  work[to .. ':' .. cur[3]] = true
  return {'ok', hgetall(id)}
end

-- The end of every writing script: counters, the node index, then the messages.
local function flush()
  local stats = P .. 'stats'
  if added ~= 0 then redis.call('HINCRBY', stats, 'events', added) end
  local by_preset = {}
  for name, n in pairs(queued) do
    if n ~= 0 then
      local preset = string.match(name, '^[^:]*:(.*)$')
      by_preset[preset] = (by_preset[preset] or 0) + n
      redis.call('HINCRBY', stats, 'l:' .. name, n)
    end
  end
  for preset, n in pairs(by_preset) do
    if n ~= 0 then redis.call('HINCRBY', stats, 'q:' .. preset, n) end
  end
  if #stopped > 0 then
    bulk('ZREM', P .. 'running', stopped)
    bulk('ZREM', P .. 's:running', stopped)
  end
  for r, ids in pairs(unran) do bulk('SREM', r, ids) end
  for node, ids in pairs(left) do
    local n = P .. 'n:' .. node
    if #ids > 0 then bulk('SREM', n, ids) end
    if redis.call('SCARD', n) == 0 then redis.call('SREM', P .. 'nodes', node) end
  end
  if #done > 0 then bulk('ZADD', P .. 'done', done) end
  if #finals > 0 then
    redis.call('PUBLISH', P .. 'ch', 'f\t' .. inst .. '\t' .. table.concat(finals, ' '))
  end
  local queues = {}
  for name in pairs(work) do queues[#queues + 1] = name end
  if #queues > 0 then
    redis.call('PUBLISH', P .. 'ch', 'w\t' .. inst .. '\t' .. table.concat(queues, '\n'))
  end
end
"""

SUBMIT = PRELUDE + r"""
-- ARGV[5]: how many specs; each (SPEC_ARGS of them): id key bodyhash preset lane priority
-- firstevent input wish timeout contenttype fallbackreason submittedby ('' for none).
local count = tonumber(ARGV[5])
local specs = {}
for s = 1, count do specs[s] = {6 + (s - 1) * 13} end
-- First pass, nothing written: a key used before (or earlier in this batch) with another
-- body refuses the whole batch.
local seen = {}
for s = 1, count do
  local b = specs[s][1]
  local key, hash = ARGV[b + 1], ARGV[b + 2]
  if key ~= '' then
    local prev = seen[key]
    if not prev then
      local v = redis.call('GET', P .. 'k:' .. key)
      if v and redis.call('EXISTS', P .. 't:' .. string.sub(v, -24)) == 1 then
        prev = {string.sub(v, 1, -26), string.sub(v, -24)}
      else
        prev = {hash, ARGV[b]}
      end
      seen[key] = prev
    end
    if prev[1] ~= hash then return {'conflict', key, prev[2]} end
  end
end
local out = {}
local seq = redis.call('INCRBY', P .. 'seq', count) - count
local all = {}
for s = 1, count do
  local b = specs[s][1]
  local id, key = ARGV[b], ARGV[b + 1]
  local owner = nil
  if key ~= '' then owner = string.sub(seen[key][2], 1, 24) end
  if owner and owner ~= id and redis.call('EXISTS', P .. 't:' .. owner) == 1 then
    out[s] = {0, hgetall(owner)}
  else
    local preset, lane, prio = ARGV[b + 3], ARGV[b + 4], ARGV[b + 5]
    seq = seq + 1
    local f = {'id', id, 'seq', seq, 'p', preset, 's', 'queued', 'in', ARGV[b + 7], 'bp', prio,
               'ep', prio, 'w', ARGV[b + 8], 'l', lane, 'c', now, 'a', 0, 'tk', 0, 'ev', 1}
    for j, name in ipairs({'to', 'ct', 'fr', 'by'}) do
      if ARGV[b + 8 + j] ~= '' then
        f[#f + 1] = name
        f[#f + 1] = ARGV[b + 8 + j]
      end
    end
    if key ~= '' then
      f[#f + 1] = 'k'
      f[#f + 1] = key
    end
    redis.call('HSET', P .. 't:' .. id, unpack(f))
    all[#all + 1] = seq
    all[#all + 1] = id
    redis.call('ZADD', P .. 'p:' .. preset, seq, id)
    xadd_from(id, {'state', ARGV[b + 6]}, 1)
    enqueue(id, preset, lane, prio, seq)
    if key ~= '' then
      redis.call('SET', P .. 'k:' .. key, ARGV[b + 2] .. ' ' .. id)
      redis.call('HINCRBY', P .. 'stats', 'keys', 1)
    end
    out[s] = {1, seq}
  end
end
if #all > 0 then bulk('ZADD', P .. 'all', all) end
flush()
return {'ok', out}
"""

GET_MANY = r"""
-- ARGV: task ids; each task's fields as HGETALL gives them (empty for an unknown id).
local out = {}
for i, id in ipairs(ARGV) do out[i] = redis.call('HGETALL', '""" + PREFIX + r"""t:' .. id) end
return out
"""

BY_KEY = PRELUDE + r"""
local v = redis.call('GET', P .. 'k:' .. ARGV[5])
if not v then return nil end
return hgetall(string.sub(v, -24))
"""

QUEUE_HEADS = PRELUDE + r"""
-- ARGV[5..]: preset, lane pairs. Answers preset lane priority seq id per non-empty queue.
local out = {}
for i = 5, #ARGV, 2 do
  local got = redis.call('ZRANGE', qkey(ARGV[i + 1], ARGV[i]), 0, 0, 'WITHSCORES')
  if #got > 0 then
    local sc = tonumber(got[2])
    local rank = math.floor(sc / 1099511627776)
    out[#out + 1] = {ARGV[i], ARGV[i + 1], 100 - rank, sc - rank * 1099511627776, got[1]}
  end
end
return out
"""

AGE = PRELUDE + r"""
-- ARGV[5..8]: step_s, most tasks to look at, the queue and the score to go on after ('' and
-- '' to start). Lift each queued task's effective priority to base + waited / step, queue by
-- queue in name order, each by score. Answers {lifted, queue, score} to go on from, or
-- {lifted, '', ''} at the end: a deep backlog is aged over several short calls, never in
-- one that holds the server (a lifted task's score drops, so it is not met again).
local step, budget = tonumber(ARGV[5]), tonumber(ARGV[6])
local from, after = ARGV[7], ARGV[8]
local at = tonumber(now)
local changed = 0
local names = redis.call('SMEMBERS', P .. 'queues')
table.sort(names)
for _, name in ipairs(names) do
  if name >= from then
    local q = P .. 'q:' .. name
    local lo = '-inf'
    if name == from and after ~= '' then lo = '(' .. after end
    local got = redis.call('ZRANGEBYSCORE', q, lo, '+inf', 'WITHSCORES', 'LIMIT', 0, budget)
    if #got == 0 and lo == '-inf' then redis.call('SREM', P .. 'queues', name) end
    for i = 1, #got, 2 do
      local id = got[i]
      local h = redis.call('HMGET', P .. 't:' .. id, 'bp', 'ep', 'c', 'seq')
      if h[1] then
        local lifted = tonumber(h[1]) + math.floor((at - tonumber(h[3])) / step)
        if lifted > 100 then lifted = 100 end
        if lifted > tonumber(h[2]) then
          redis.call('HSET', P .. 't:' .. id, 'ep', lifted)
          redis.call('ZADD', q, score(lifted, h[4]), id)
          changed = changed + 1
        end
      end
    end
    budget = budget - #got / 2
    if budget <= 0 then return {changed, name, got[#got]} end
  end
end
return {changed, '', ''}
"""

CLAIM = PRELUDE + r"""
-- ARGV[5..9]: preset lane limit node device. Answers the claimed tasks in queue order.
-- An entry whose task hash is gone (a Redis that evicts keys: gpulane needs noeviction) is
-- dropped and another popped in its place, rather than erring after the pop (a script's
-- writes are not rolled back, so the batch popped with it would be lost from the queue).
local preset, lane, node, device = ARGV[5], ARGV[6], ARGV[8], ARGV[9]
local limit = tonumber(ARGV[7])
local out = {}
local ids, runs, beats, gone = {}, {}, {}, {}
while #ids < limit do
  local popped = redis.call('ZPOPMIN', qkey(lane, preset), limit - #ids)
  if #popped == 0 then break end
  for i = 1, #popped, 2 do
    local id = popped[i]
    local t = P .. 't:' .. id
    local h = redis.call('HMGET', t, 'a', 'tk', 'seq', 'fr', 'ev')
    if not h[1] then
      gone[#gone + 1] = id
    else
      local attempt, ev = tonumber(h[1]) + 1, tonumber(h[5]) + 1
      redis.call('HSET', t, 's', 'running', 'st', now, 'n', node, 'd', device, 'a', attempt,
                 'tk', tonumber(h[2]) + 1, 'ev', ev)
      local data = {state = 'running', attempt = attempt, node = node, device = device,
                    fallback_reason = h[4] or cjson.null}
      xadd_from(id, {'state', cjson.encode(data)}, ev)
      ids[#ids + 1] = id
      runs[#runs + 1] = h[3]
      runs[#runs + 1] = id
      beats[#beats + 1] = now
      beats[#beats + 1] = id
      out[#out + 1] = hgetall(id)
    end
  end
end
if #gone > 0 then
  bulk('ZREM', P .. 's:queued', gone)
  queued[lane .. ':' .. preset] = -#gone
end
if #ids > 0 then
  bulk('ZREM', P .. 's:queued', ids)
  bulk('SADD', P .. 'n:' .. node, ids)
  bulk('SADD', P .. 'r:' .. lane .. ':' .. preset, ids)
  redis.call('SADD', P .. 'rlanes', lane .. ':' .. preset)
  bulk('ZADD', P .. 's:running', runs)
  bulk('ZADD', P .. 'running', beats)
  redis.call('SADD', P .. 'nodes', node)
  redis.call('HINCRBY', P .. 'stats', 'c:' .. preset, #ids)
  queued[lane .. ':' .. preset] = (queued[lane .. ':' .. preset] or 0) - #ids
end
flush()
return out
"""

APPEND = PRELUDE + r"""
-- ARGV[5]: id; ARGV[6..]: type, data pairs. Answers {last number, state} or nil.
local id = ARGV[5]
local state = redis.call('HGET', P .. 't:' .. id, 's')
if not state then return nil end
local evs = {}
for i = 6, #ARGV do evs[#evs + 1] = ARGV[i] end
local last = xadd(id, evs)
flush()
return {last, state}
"""

FINISH = PRELUDE + r"""
-- ARGV[5]: count; each item: id token state output error nevents (type data)... The final
-- state event, {"state": ..., "error": ...}, is added here.
local out = {}
local i = 6
for s = 1, tonumber(ARGV[5]) do
  local ne = tonumber(ARGV[i + 5])
  local state, err = ARGV[i + 2], ARGV[i + 4]
  local evs = {}
  for j = 1, 2 * ne do evs[j] = ARGV[i + 5 + j] end
  evs[#evs + 1] = 'state'
  evs[#evs + 1] = '{"state":"' .. state .. '","error":' .. (err ~= '' and err or 'null') .. '}'
  out[s] = finish(ARGV[i], ARGV[i + 1], state, ARGV[i + 3], err, evs)
  i = i + 6 + 2 * ne
end
flush()
return out
"""

REQUEUE = PRELUDE + r"""
-- ARGV[5..10]: id token error spent lane reason ('' for its own lane, its reason kept);
-- ARGV[11..]: type, data pairs.
local evs = {}
for i = 11, #ARGV do evs[#evs + 1] = ARGV[i] end
local got = requeue(ARGV[5], ARGV[6], ARGV[7], ARGV[8], evs, ARGV[9], ARGV[10])
flush()
return got
"""

CANCEL = PRELUDE + r"""
-- ARGV[5..7]: id error stateevent. Answers the cancelled task, or nil if it was not queued.
local id = ARGV[5]
local t = P .. 't:' .. id
local h = redis.call('HMGET', t, 's', 'p', 'l', 'seq', 'k')
if h[1] ~= 'queued' then return nil end
redis.call('ZREM', qkey(h[3], h[2]), id)
redis.call('ZREM', P .. 's:queued', id)
queued[h[3] .. ':' .. h[2]] = -1
xadd(id, {'state', ARGV[7]})
redis.call('HSET', t, 's', 'cancelled', 'err', ARGV[6], 'f', now)
ended(id, 'cancelled', h[2], h[4], h[5])
flush()
return hgetall(id)
"""

RETRY = PRELUDE + r"""
-- ARGV[5]: id. A dead letter back in its queue with fresh attempts, or nil.
local id = ARGV[5]
local t = P .. 't:' .. id
local h = redis.call('HMGET', t, 's', 'p', 'l', 'seq', 'k', 'ep')
if h[1] ~= 'failed' and h[1] ~= 'cancelled' then return nil end
xadd(id, {'state', cjson.encode({state = 'queued', reason = 'retried after ' .. h[1]})})
redis.call('HSET', t, 's', 'queued', 'a', 0)
redis.call('HDEL', t, 'out', 'err', 'n', 'd', 'st', 'f')
redis.call('ZREM', P .. 's:' .. h[1], id)
redis.call('ZREM', P .. 'done', id .. h[2])
redis.call('PERSIST', t)
redis.call('PERSIST', P .. 'e:' .. id)
if h[5] then redis.call('PERSIST', P .. 'k:' .. h[5]) end
enqueue(id, h[2], h[3], h[6], h[4])
flush()
return hgetall(id)
"""
