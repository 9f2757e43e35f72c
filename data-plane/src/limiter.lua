-- Tollgate: decide a batch of requests, in order. For each request, check every one of its
-- limits and quotas, and consume them only if all allow it (a refused request consumes
-- nothing). The data plane sends the requests that arrived while its previous call was in
-- flight as one batch: one EVALSHA, one round trip, for all of them. Each request is decided
-- exactly as if it had been sent alone, in this order.
--
-- KEYS: the keys of every request, request after request.
-- ARGV[1]: the number of requests.
-- Then per request: its time (Unix milliseconds, the data plane's clock when it arrived), a
--   member unique to this admission (for the sliding-window sets), its number of keys n, and
--   per key: kind ('1' = sliding window, '2' = calendar quota), limit, then for a window its
--   length in ms and the cutoff (time - length: older admissions no longer count), for a
--   quota the end of the period in Unix ms and '0'.
--
-- Numbers stay the strings the data plane sent wherever Redis only passes them on (scores,
-- TTLs): turning a Lua number back into a string costs a float formatting and a parse each
-- time, which was most of this script's cost.
--
-- Sliding window (exact): a sorted set of the admission times within the last window; a
-- request is admitted while fewer than `limit` remain.
-- Quota: a counter that expires at the end of its calendar period.
--
-- Within a batch, a key is read once per distinct request time and written once: the
-- script keeps each key's count in a table, counts the admissions it decides, and writes them
-- (one ZADD with every new member, one INCRBY) when the time changes and at the end. The
-- decisions are those of deciding each request alone, in order: for one key and one time, a
-- lone call would prune with the same cutoff and count what is already there plus the
-- admissions before it.
--
-- Returns, request after request, {admitted (0|1), count_1, retry_ms_1, ..., count_n,
-- retry_ms_n}: for each key the count after this request (or the count that refused it), and
-- for a window that refused, ms until its oldest admission leaves it (-1 otherwise: the data
-- plane knows the window length and the period end).
local requests = tonumber(ARGV[1])
local out = {}
local arg = 2
local key = 1
-- Per key: {now, count, pending (ZADD arguments or INCRBY amount), ttl argument}.
local cache = {}

local function flush(k, c)
  if c.window then
    if #c.pending > 0 then
      redis.call('ZADD', k, unpack(c.pending))
      redis.call('PEXPIRE', k, c.ttl)
      c.pending = {}
    end
  elseif c.pending > 0 then
    redis.call('INCRBY', k, c.pending)
    redis.call('PEXPIREAT', k, c.ttl)
    c.pending = 0
  end
end

for _ = 1, requests do
  local now = ARGV[arg]
  local member = ARGV[arg + 1]
  local n = tonumber(ARGV[arg + 2])
  arg = arg + 3
  local admitted = 1
  local counts = {}
  local retries = {}
  local entries = {}
  for i = 1, n do
    local k = KEYS[key + i - 1]
    local base = arg + 4 * (i - 1)
    local window = ARGV[base] == '1'
    local limit = tonumber(ARGV[base + 1])
    local c = cache[k]
    if window then
      if c == nil or c.now ~= now then
        if c ~= nil then
          flush(k, c)
        end
        redis.call('ZREMRANGEBYSCORE', k, '-inf', ARGV[base + 3])
        c = {window = true, now = now, count = redis.call('ZCARD', k), pending = {}}
        cache[k] = c
      end
    elseif c == nil then
      c = {window = false, count = tonumber(redis.call('GET', k) or '0'), pending = 0}
      cache[k] = c
    end
    c.ttl = ARGV[base + 2]
    entries[i] = c
    counts[i] = c.count
    retries[i] = -1
    if c.count >= limit then
      admitted = 0
      if window and c.count > 0 then
        flush(k, c)
        local oldest = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
        retries[i] = tonumber(oldest[2]) + tonumber(ARGV[base + 2]) - tonumber(now)
      end
    end
  end
  if admitted == 1 then
    for i = 1, n do
      local c = entries[i]
      c.count = c.count + 1
      if c.window then
        c.pending[#c.pending + 1] = now
        c.pending[#c.pending + 1] = member
      else
        c.pending = c.pending + 1
      end
      counts[i] = c.count
    end
  end
  out[#out + 1] = admitted
  for i = 1, n do
    out[#out + 1] = counts[i]
    out[#out + 1] = retries[i]
  end
  arg = arg + 4 * n
  key = key + n
end
for k, c in pairs(cache) do
  flush(k, c)
end
return out
