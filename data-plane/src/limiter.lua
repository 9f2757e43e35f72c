-- Tollgate: decide a batch of requests, in order. For each request, check every one of its
-- limits and quotas, and consume them only if all allow it (a refused request consumes
-- nothing). The data plane sends the requests that arrived while its previous call was in
-- flight as one batch: one EVALSHA, one round trip, for all of them. Each request is decided
-- exactly as if it had been sent alone, in this order, at its group's time.
--
-- The batch's distinct limits come first, once each; requests name them by index.
-- ARGV[1]: the number of distinct limits D. Then per limit: kind ('1' = sliding window,
--   '2' = calendar quota), limit, and for a window its length in ms, for a quota the end of
--   its period in Unix ms.
-- KEYS, limit after limit: a window has two keys (`<name>|ms`, a sorted set of the
--   milliseconds that hold admissions; `<name>|n`, a hash of admissions per millisecond plus
--   the total under 't'), a quota one (its counter).
-- Then the number of groups G, and per group: its time (Unix ms; the data plane sends one time
--   per batch, its latest arrival, but the script takes any), its number of requests m, its
--   number of limits n, and the index (1-based) of each. A group is a run of requests,
--   consecutive in the batch, with the same time and the same limits: identical requests, so
--   deciding them one by one admits the first k = min(m, room left in each limit) and refuses
--   the rest. The script computes k once; its work follows the number of groups, not of
--   requests.
--
-- Sliding window (exact, at millisecond resolution like the times themselves): a request is
-- admitted while fewer than `limit` admissions happened after time - length. Admissions are
-- counted per millisecond, not one sorted-set member each: the work follows the number of
-- distinct milliseconds, not of requests. Expired milliseconds are subtracted from the total
-- and removed when a later request looks.
-- Quota: a counter that expires at the end of its calendar period.
--
-- Within a batch, a key is read once per distinct request time and written once per distinct
-- time: the script keeps each limit's count in a table, counts the admissions it decides, and
-- writes them when the time changes and at the end. The decisions are those of deciding each
-- request alone, in order.
--
-- Numbers stay the strings the data plane sent wherever Redis only passes them on (scores,
-- TTLs). A number computed here goes to Redis as `int(n)`, a string: Redis turns a Lua number
-- argument into a string with a float formatting (%.17g), several times the cost.
--
-- Expiry: a window's keys must outlive their latest admission by the window's length. Setting
-- that on every call cost two PEXPIREs per call; instead a move gives the keys the length plus
-- two slacks (slack = the length, at most 10 s) and notes in the hash, under 'x', the time they
-- now live until. A call moves the expiry again only when its latest admission + length + one
-- slack is past 'x' (so about once per slack, and at once when the length grows). Keys outlive
-- their last admission by at most two slacks; one slack absorbs clock differences between data
-- planes. A window whose admissions have all left is deleted whole (both keys), so a key is
-- never recreated under an 'x' that no longer applies to it.
--
-- Returns, group after group, {k (requests admitted), count_1, retry_ms_1, ..., count_n,
-- retry_ms_n}: for each limit the count after the group's k admissions (for the refused
-- requests, the count that refused them), and, when some were refused, for a window that
-- refused them the ms until its oldest admission leaves it (-1 otherwise: the data plane knows
-- the window length and the period end). The data plane derives each request's answer: the
-- j-th admitted (1-based) saw count - k + j.

local function int(n)
  return string.format('%d', n)
end

local limits = {}
local arg = 2
local key = 1
for j = 1, tonumber(ARGV[1]) do
  -- Every field in the constructor: a field added later costs a rehash of the table.
  local window = ARGV[arg] == '1'
  limits[j] = {window = window, limit = tonumber(ARGV[arg + 1]), span = ARGV[arg + 2],
    k = KEYS[key], n = window and KEYS[key + 1], length = window and tonumber(ARGV[arg + 2])}
  key = key + (window and 2 or 1)
  arg = arg + 3
end

-- Per key: {now, t (now as a number), count (in the window, pending included), bucket
-- (admissions stored at `now`), pending (admissions at `now` not written yet), dirty (the
-- stored total is stale), written (admissions were written), latest (the latest time written),
-- covered (the stored 'x': the time the keys live until)}.
local cache = {}

-- Starts a window afresh: every admission it held has left. UNLINK frees a big one in the
-- background. Nothing to write: a missing total reads as 0, and the next write creates both
-- keys again and gives them their expiry (nothing is covered).
local function restart(l, c)
  redis.call('UNLINK', l.k, l.n)
  c.count = 0
  c.bucket = 0
  c.covered = 0
  c.latest = 0
  c.dirty = false
  c.written = false
end

-- Writes the admissions counted at `c.now` (with the total, in the same command).
local function flush(l, c)
  if c.pending == 0 then
    return
  end
  if l.window then
    if c.bucket == 0 then
      redis.call('ZADD', l.k, c.now, c.now)
    end
    c.bucket = c.bucket + c.pending
    redis.call('HSET', l.n, c.now, int(c.bucket), 't', int(c.count))
    c.dirty = false
    c.written = true
    if c.t > c.latest then
      c.latest = c.t
    end
  else
    redis.call('INCRBY', l.k, int(c.pending))
    redis.call('PEXPIREAT', l.k, l.span)
  end
  c.pending = 0
end

-- Moves a window's view to `now`: reads the admissions already stored at `now` (and, the
-- first time, the stored total and 'x'), then subtracts the milliseconds that left the window and
-- drops them, reading their counts in the same HMGET, 1000 at a time and at most 8000 per
-- script call (over all keys and times): Redis is never blocked long. Milliseconds left for a
-- later call still count (the window admits fewer, never more).
local prune_left = 8000
local function advance(l, c, now, first)
  c.t = tonumber(now)
  local cutoff = c.t - l.length
  local chunk = 0
  local take
  local gone
  repeat
    chunk = chunk + 1
    take = math.min(1000, prune_left)
    gone = {}
    if take > 0 then
      gone = redis.call('ZRANGEBYSCORE', l.k, '-inf', int(cutoff), 'LIMIT', '0',
        take == 1000 and '1000' or int(take))
      prune_left = prune_left - #gone
    end
    if chunk == 1 and take > 0 and #gone == take then
      -- Many have left; after a long quiet spell all of them may have: then start afresh.
      local newest = redis.call('ZRANGE', l.k, -1, -1, 'WITHSCORES')
      if newest[2] == nil or tonumber(newest[2]) <= cutoff then
        prune_left = prune_left + #gone
        restart(l, c)
        return
      end
    end
    local values
    local skip = 1
    if first then
      skip = 3
      values = redis.call('HMGET', l.n, now, 't', 'x', unpack(gone))
    else
      values = redis.call('HMGET', l.n, now, unpack(gone))
    end
    c.bucket = tonumber(values[1] or '0')
    if first then
      c.count = tonumber(values[2] or '0')
      c.covered = tonumber(values[3] or '0')
      first = false
    end
    if #gone > 0 then
      for i = 1, #gone do
        c.count = c.count - tonumber(values[skip + i] or '0')
      end
      if c.count <= 0 then
        -- The last ones left (each millisecond holds at least one admission): deleting them
        -- one by one would leave the hash (its 't' and 'x') without the sorted set.
        restart(l, c)
        return
      end
      redis.call('HDEL', l.n, unpack(gone))
      redis.call('ZREM', l.k, unpack(gone))
      c.dirty = true
    end
  until take == 0 or #gone < take
end

local out = {}
-- The limits of the group at hand (reused from group to group: indexes are parsed once).
local group = {}
for _ = 1, tonumber(ARGV[arg]) do
  local now = ARGV[arg + 1]
  local size = tonumber(ARGV[arg + 2])
  local n = tonumber(ARGV[arg + 3])
  local first = arg + 4
  arg = arg + 3 + n
  local room = size
  for i = 1, n do
    local l = limits[tonumber(ARGV[first + i - 1])]
    group[i] = l
    local c = cache[l.k]
    if l.window then
      if c == nil then
        c = {now = now, t = 0, count = 0, bucket = 0, pending = 0, dirty = false, written = false,
          latest = 0, covered = 0}
        cache[l.k] = c
        advance(l, c, now, true)
      elseif c.now ~= now then
        flush(l, c)
        c.now = now
        advance(l, c, now, false)
      end
    elseif c == nil then
      c = {now = now, count = tonumber(redis.call('GET', l.k) or '0'), pending = 0, t = 0}
      cache[l.k] = c
    end
    if l.limit - c.count < room then
      room = l.limit - c.count
    end
  end
  if room < 0 then
    room = 0
  end
  local base = #out + 1
  out[base] = room
  for i = 1, n do
    local l = group[i]
    local c = cache[l.k]
    c.count = c.count + room
    c.pending = c.pending + room
    out[base + 2 * i - 1] = c.count
    out[base + 2 * i] = -1
    if room < size and l.window and c.count >= l.limit and c.count > 0 then
      flush(l, c)
      -- The oldest millisecond still in the window (expired ones not pruned yet are not).
      local oldest = redis.call('ZRANGEBYSCORE', l.k, '(' .. int(tonumber(now) - l.length), '+inf',
        'WITHSCORES', 'LIMIT', '0', '1')
      if oldest[2] then
        out[base + 2 * i] = tonumber(oldest[2]) + l.length - tonumber(now)
      end
    end
  end
end
for j = 1, #limits do
  local l = limits[j]
  local c = cache[l.k]
  if c ~= nil then
    flush(l, c)
    -- Everything counted leaves the window one length after the latest admission: move the
    -- expiry when that (plus a slack) is past what the last move covered (see the top).
    local extend = false
    local ttl
    if c.written then
      local slack = math.min(l.length, 10000)
      if c.latest + l.length + slack > c.covered then
        extend = true
        ttl = l.length + 2 * slack
        c.covered = c.latest + ttl
      end
    end
    -- The total (milliseconds left the window after the last write) and the new note, in one
    -- HSET.
    if c.dirty and extend then
      redis.call('HSET', l.n, 't', int(c.count), 'x', int(c.covered))
    elseif c.dirty then
      redis.call('HSET', l.n, 't', int(c.count))
    elseif extend then
      redis.call('HSET', l.n, 'x', int(c.covered))
    end
    if extend then
      redis.call('PEXPIRE', l.k, int(ttl))
      redis.call('PEXPIRE', l.n, int(ttl))
    end
    c.dirty = false
    c.written = false
  end
end
return out
