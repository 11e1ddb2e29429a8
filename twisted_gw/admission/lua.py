"""
The cluster's atomic steps, as Lua scripts Redis runs whole: take a place,
give one back, join or leave the fair queue, pick the next waiter, charge a
quota.  No step is a read in Python followed by a write.

Every key starts with C{P} (C{llmgw:{cluster}:}).  The state:
  - C{replicas} (zset): replica -> when it last renewed its leases (Redis's clock);
  - C{routes} (hash): upstream -> places (0 while it is not routable);
  - C{active} (hash): upstream -> places held; C{running} (hash): user -> places held;
  - C{held:<replica>} (hash): lease -> "upstream<TAB>user", the places a replica holds;
  - C{queue} (zset): waiting request -> its start tag (start-time fair queuing, as on one node);
  - C{meta} (hash): waiting request -> JSON: replica, user, cap, candidate upstreams, preferred one;
  - C{queued:<replica>} (set), C{qcount} (hash: user -> waiting);
  - C{virtual}, C{finish} (hash: user -> finish tag): the fair queue's virtual time;
  - C{grants:<replica>} (list): places handed to a replica's waiters, "lease<TAB>upstream";
  - C{minute:<user>} (zset), C{day:<user>:<day>}: quota use.
A replica's places are leases: one whose renewal is older than the lease
timeout is reaped, its places given back and its waiters taken out.
"""

COMMON = r"""
local P = ARGV[1]
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local FIRST = -1e12

local function decr(key, field)
  if redis.call('HINCRBY', key, field, -1) <= 0 then redis.call('HDEL', key, field) end
end

local function release(replica, id)
  local v = redis.call('HGET', P .. 'held:' .. replica, id)
  if not v then return 0 end
  redis.call('HDEL', P .. 'held:' .. replica, id)
  local tab = string.find(v, '\t', 1, true)
  decr(P .. 'active', string.sub(v, 1, tab - 1))
  decr(P .. 'running', string.sub(v, tab + 1))
  return 1
end

local function hold(replica, id, route, user)
  if redis.call('HSETNX', P .. 'held:' .. replica, id, route .. '\t' .. user) == 1 then
    redis.call('HINCRBY', P .. 'active', route, 1)
    redis.call('HINCRBY', P .. 'running', user, 1)
  end
end

-- take a waiting request out of the queue; gone: it left (its share is given back if it was its user's last)
local function unqueue(id, gone)
  local raw = redis.call('HGET', P .. 'meta', id)
  if not raw then return nil end
  local m = cjson.decode(raw)
  local score = tonumber(redis.call('ZSCORE', P .. 'queue', id))
  redis.call('HDEL', P .. 'meta', id)
  redis.call('ZREM', P .. 'queue', id)
  redis.call('SREM', P .. 'queued:' .. m.r, id)
  local virtual = tonumber(redis.call('GET', P .. 'virtual') or '0')
  if redis.call('HINCRBY', P .. 'qcount', m.u, -1) <= 0 then
    redis.call('HDEL', P .. 'qcount', m.u)
    if gone and score > FIRST and redis.call('HEXISTS', P .. 'finish', m.u) == 1 then
      redis.call('HSET', P .. 'finish', m.u, math.max(virtual, score))
    end
  end
  if not gone and score > virtual then redis.call('SET', P .. 'virtual', score) end
  return m
end

local function enqueue(replica, id, user, weight, cap, first, cands, prefer)
  local score = FIRST
  if first ~= 1 then
    local virtual = tonumber(redis.call('GET', P .. 'virtual') or '0')
    score = math.max(virtual, tonumber(redis.call('HGET', P .. 'finish', user) or '0'))
    redis.call('HSET', P .. 'finish', user, score + 1 / weight)
  end
  redis.call('ZADD', P .. 'queue', score, id)
  redis.call('HSET', P .. 'meta', id, cjson.encode({r = replica, u = user, c = cap, k = cands, p = prefer}))
  redis.call('SADD', P .. 'queued:' .. replica, id)
  redis.call('HINCRBY', P .. 'qcount', user, 1)
end

-- a replica gone: its places given back, its waiters out of the queue
local function drop(r)
  for _, id in ipairs(redis.call('HKEYS', P .. 'held:' .. r)) do release(r, id) end
  for _, id in ipairs(redis.call('SMEMBERS', P .. 'queued:' .. r)) do unqueue(id, true) end
  redis.call('DEL', P .. 'held:' .. r, P .. 'queued:' .. r, P .. 'grants:' .. r)
  redis.call('ZREM', P .. 'replicas', r)
end

-- the replicas whose leases ran out (killed, cut off)
local function reap(timeout)
  local dead = redis.call('ZRANGEBYSCORE', P .. 'replicas', '-inf', now() - timeout)
  for _, r in ipairs(dead) do drop(r) end
  return #dead
end

-- hand free places to the waiters whose turn it is, in queue order, skipping those that may not run now
local function dispatch(gap)
  local routes = redis.call('HGETALL', P .. 'routes')
  local free, places, active, names, total = {}, {}, {}, {}, 0
  for i = 1, #routes, 2 do
    local name, n = routes[i], tonumber(routes[i + 1])
    local a = tonumber(redis.call('HGET', P .. 'active', name) or '0')
    names[#names + 1] = name
    places[name], active[name] = n, a
    free[name] = math.max(0, n - a)
    total = total + free[name]
  end
  local start = 0
  while total > 0 do
    local ids = redis.call('ZRANGE', P .. 'queue', start, start + 99)
    if #ids == 0 then break end
    local granted = 0
    for _, id in ipairs(ids) do
      local m = cjson.decode(redis.call('HGET', P .. 'meta', id))
      if m.c < 0 or tonumber(redis.call('HGET', P .. 'running', m.u) or '0') < m.c then
        local cands = m.k
        if #cands == 0 then cands = names end
        local pick, best, least = nil, 0, math.huge
        for _, name in ipairs(cands) do
          local f = free[name] or 0
          if f > best then pick, best = name, f end
          if places[name] and places[name] > 0 then least = math.min(least, active[name] / places[name]) end
        end
        local p = m.p
        if p ~= '' and (free[p] or 0) > 0 and active[p] / places[p] - least <= gap then pick = p end
        if pick then
          unqueue(id, false)
          hold(m.r, id, pick, m.u)
          redis.call('RPUSH', P .. 'grants:' .. m.r, id .. '\t' .. pick)
          free[pick] = free[pick] - 1
          active[pick] = active[pick] + 1
          total = total - 1
          granted = granted + 1
          if total == 0 then break end
        end
      end
    end
    start = start + #ids - granted
  end
end

-- what a replica is told back after each step: its grants, and the cluster's queue
local function answer(replica, status)
  local key = P .. 'grants:' .. replica
  local grants = redis.call('LRANGE', key, 0, -1)
  redis.call('DEL', key)
  local active = 0
  local a = redis.call('HVALS', P .. 'active')
  for _, n in ipairs(a) do active = active + tonumber(n) end
  return {status, redis.call('ZCARD', P .. 'queue'), active, redis.call('ZCARD', P .. 'replicas'), grants}
end
"""

# ARGV: P, replica, seconds without renewal after which a replica is reaped, balance gap
BEAT = COMMON + r"""
local replica, timeout, gap = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if not redis.call('ZSCORE', P .. 'replicas', replica) then return answer(replica, 'unknown') end
redis.call('ZADD', P .. 'replicas', now(), replica)
reap(timeout)
dispatch(gap)
return answer(replica, 'ok')
"""

# ARGV: P, replica, seconds without renewal after which a replica is reaped, balance gap,
#       held JSON [[lease, upstream, user]...],
#       waiting JSON [[id, user, weight, cap, first, [candidates], preferred]...] in queue order,
#       routes JSON {upstream: places}, replicas it last saw
# Makes the store's record of this replica what the replica holds (after the store restarted, or the
# replica was reaped while it could not reach it); places granted to its waiters meanwhile are kept.
# A store that came back empty hands out nothing ("settling": each replica goes on alone, within its
# share) until the replicas its members last saw are all back, or for a lease timeout at most: until
# then it does not know what the others hold.
SYNC = COMMON + r"""
local replica, timeout, gap = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local held, waiting, routes = cjson.decode(ARGV[5]), cjson.decode(ARGV[6]), cjson.decode(ARGV[7])
local t = now()
redis.call('ZADD', P .. 'replicas', t, replica)
reap(timeout)
redis.call('SET', P .. 'born', t, 'NX')
local expect = math.max(tonumber(ARGV[8]), tonumber(redis.call('GET', P .. 'expect') or '0'))
redis.call('SET', P .. 'expect', expect)
local settling = t < tonumber(redis.call('GET', P .. 'born')) + timeout
  and redis.call('ZCARD', P .. 'replicas') < expect
for name, n in pairs(routes) do redis.call('HSET', P .. 'routes', name, n) end
local keep = {}
for _, h in ipairs(held) do keep[h[1]] = true end
for _, g in ipairs(redis.call('LRANGE', P .. 'grants:' .. replica, 0, -1)) do
  keep[string.sub(g, 1, string.find(g, '\t', 1, true) - 1)] = true  -- (handed to a waiter it still has: answered below)
end
for _, id in ipairs(redis.call('HKEYS', P .. 'held:' .. replica)) do
  if not keep[id] then release(replica, id) end
end
for _, h in ipairs(held) do hold(replica, h[1], h[2], h[3]) end
local want = {}
for _, w in ipairs(waiting) do want[w[1]] = true end
for _, id in ipairs(redis.call('SMEMBERS', P .. 'queued:' .. replica)) do
  if not want[id] then unqueue(id, true) end
end
for _, w in ipairs(waiting) do
  if not redis.call('ZSCORE', P .. 'queue', w[1]) and redis.call('HEXISTS', P .. 'held:' .. replica, w[1]) == 0 then
    enqueue(replica, w[1], w[2], w[3], w[4], w[5], w[6], w[7])
  end
end
if settling then return answer(replica, 'settling') end
dispatch(gap)
return answer(replica, 'ok')
"""

# ARGV: P, replica, balance gap, max queue, id, user, weight, cap, max queued (-1: none),
#       first (1/0), candidates JSON, preferred
ENQUEUE = COMMON + r"""
local replica, gap = ARGV[2], tonumber(ARGV[3])
local id, user, weight, cap, max_queued = ARGV[5], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local first = tonumber(ARGV[10])
if not redis.call('ZSCORE', P .. 'replicas', replica) then return answer(replica, 'unknown') end
if first ~= 1 then
  if redis.call('ZCARD', P .. 'queue') >= tonumber(ARGV[4]) then return answer(replica, 'full') end
  if max_queued >= 0 and tonumber(redis.call('HGET', P .. 'qcount', user) or '0') >= max_queued then
    return answer(replica, 'user_full')
  end
end
enqueue(replica, id, user, weight, cap, first, cjson.decode(ARGV[11]), ARGV[12])
dispatch(gap)
return answer(replica, 'ok')
"""

# ARGV: P, replica, balance gap, lease: a place given back, or a waiter that left (whichever it is now)
RELEASE = COMMON + r"""
local replica, gap, id = ARGV[2], tonumber(ARGV[3]), ARGV[4]
if not unqueue(id, true) then release(replica, id) end
dispatch(gap)
return answer(replica, 'ok')
"""

# ARGV: P, replica, balance gap: a replica that stops gives back everything at once
LEAVE = COMMON + r"""
drop(ARGV[2])
dispatch(tonumber(ARGV[3]))
return 1
"""

# ARGV: P, replica, balance gap, upstream, places (0: not routable)
ROUTE = COMMON + r"""
local replica, gap = ARGV[2], tonumber(ARGV[3])
redis.call('HSET', P .. 'routes', ARGV[4], tonumber(ARGV[5]))
dispatch(gap)
return answer(replica, 'ok')
"""

# ARGV: P, ids...: each waiting request's place in the cluster's queue (1 = next; 0 = not waiting)
RANKS = r"""
local P = ARGV[1]
local out = {}
for i = 2, #ARGV do
  local r = redis.call('ZRANK', P .. 'queue', ARGV[i])
  out[#out + 1] = r and (r + 1) or 0
end
return out
"""

# ARGV: P, user, time (the replica's clock), member, tokens, day, 1: count it in today's total (0: it is)
CHARGE = r"""
local P, user, t = ARGV[1], ARGV[2], tonumber(ARGV[3])
local minute, day = P .. 'minute:' .. user, P .. 'day:' .. user .. ':' .. ARGV[6]
redis.call('ZADD', minute, t, ARGV[4] .. ':' .. ARGV[5])
redis.call('ZREMRANGEBYSCORE', minute, '-inf', t - 60)
redis.call('EXPIRE', minute, 120)
if ARGV[7] == '1' then
  redis.call('INCRBY', day, tonumber(ARGV[5]))
  redis.call('EXPIRE', day, 172800)
end
return 1
"""

# ARGV: P, user, time, day: the user's charges in the last minute (member, time...) and today's total
USE = r"""
local P, user, t = ARGV[1], ARGV[2], tonumber(ARGV[3])
local minute = redis.call('ZRANGEBYSCORE', P .. 'minute:' .. user, t - 60, '+inf', 'WITHSCORES')
return {minute, redis.call('GET', P .. 'day:' .. user .. ':' .. ARGV[4]) or '0'}
"""

# ARGV: P, user, day, known (today's total the replica last read), unsent (what it charged since, away):
# today's total raised to what was known (a store that restarted empty), then the charges it missed added
RESTORE_DAY = r"""
local key = ARGV[1] .. 'day:' .. ARGV[2] .. ':' .. ARGV[3]
local known = tonumber(ARGV[4])
if tonumber(redis.call('GET', key) or '0') < known then redis.call('SET', key, known) end
redis.call('INCRBY', key, tonumber(ARGV[5]))
redis.call('EXPIRE', key, 172800)
return 1
"""
