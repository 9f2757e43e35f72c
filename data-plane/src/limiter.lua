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
--   per key: kind (1 = sliding window, 2 = calendar quota), limit, and
--   for a window its length in ms, for a quota the end of the period in Unix ms.
--
-- Sliding window (exact): a sorted set of the admission times within the last window; a
-- request is admitted while fewer than `limit` remain.
-- Quota: a counter that expires at the end of its calendar period.
--
-- Returns, request after request, {admitted (0|1), count_1, reset_ms_1, ..., count_n,
-- reset_ms_n}: for each key the count after this request (or the count that refused it), and
-- ms until a slot frees up / the quota resets.
local requests = tonumber(ARGV[1])
local out = {}
local arg = 2
local key = 1
for _ = 1, requests do
  local now = tonumber(ARGV[arg])
  local member = ARGV[arg + 1]
  local n = tonumber(ARGV[arg + 2])
  arg = arg + 3
  local admitted = 1
  local counts = {}
  local resets = {}
  for i = 1, n do
    local k = KEYS[key + i - 1]
    local base = arg + 3 * (i - 1)
    local kind = tonumber(ARGV[base])
    local limit = tonumber(ARGV[base + 1])
    local span = tonumber(ARGV[base + 2])
    if kind == 1 then
      redis.call('ZREMRANGEBYSCORE', k, '-inf', now - span)
      local count = redis.call('ZCARD', k)
      local reset = span
      if count > 0 then
        local oldest = redis.call('ZRANGE', k, 0, 0, 'WITHSCORES')
        reset = tonumber(oldest[2]) + span - now
      end
      counts[i] = count
      resets[i] = reset
    else
      counts[i] = tonumber(redis.call('GET', k) or '0')
      resets[i] = span - now
    end
    if counts[i] >= limit then
      admitted = 0
    end
  end
  if admitted == 1 then
    for i = 1, n do
      local k = KEYS[key + i - 1]
      local base = arg + 3 * (i - 1)
      local kind = tonumber(ARGV[base])
      local span = tonumber(ARGV[base + 2])
      if kind == 1 then
        redis.call('ZADD', k, now, member)
        redis.call('PEXPIRE', k, span)
      else
        redis.call('INCR', k)
        redis.call('PEXPIREAT', k, span)
      end
      counts[i] = counts[i] + 1
    end
  end
  out[#out + 1] = admitted
  for i = 1, n do
    out[#out + 1] = counts[i]
    out[#out + 1] = resets[i]
  end
  arg = arg + 3 * n
  key = key + n
end
return out
