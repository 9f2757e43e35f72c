-- Tollgate: check every limit and quota of one request, and consume them only if all allow it.
-- One call per request (EVALSHA). A refused request consumes nothing.
--
-- KEYS[i]: one key per limit.
-- ARGV[1]: now, Unix milliseconds (the data plane's clock).
-- ARGV[2]: a member unique to this request (for the sliding-window sets).
-- ARGV[3 + 3*(i-1) ..]: per key: kind (1 = sliding window, 2 = calendar quota), limit, and
--   for a window its length in ms, for a quota the end of the period in Unix ms.
--
-- Sliding window (exact): a sorted set of the admission times within the last window; a
-- request is admitted while fewer than `limit` remain.
-- Quota: a counter that expires at the end of its calendar period.
--
-- Returns {admitted (0|1), count_1, reset_ms_1, count_2, reset_ms_2, ...}: for each key the count
-- after this request (or the count that refused it), and ms until a slot frees up / the quota
-- resets.
local now = tonumber(ARGV[1])
local member = ARGV[2]
local admitted = 1
local counts = {}
local resets = {}
for i = 1, #KEYS do
  local base = 3 + 3 * (i - 1)
  local kind = tonumber(ARGV[base])
  local limit = tonumber(ARGV[base + 1])
  local span = tonumber(ARGV[base + 2])
  if kind == 1 then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - span)
    local count = redis.call('ZCARD', KEYS[i])
    local reset = span
    if count > 0 then
      local oldest = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
      reset = tonumber(oldest[2]) + span - now
    end
    counts[i] = count
    resets[i] = reset
  else
    counts[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
    resets[i] = span - now
  end
  if counts[i] >= limit then
    admitted = 0
  end
end
if admitted == 1 then
  for i = 1, #KEYS do
    local base = 3 + 3 * (i - 1)
    local kind = tonumber(ARGV[base])
    local span = tonumber(ARGV[base + 2])
    if kind == 1 then
      redis.call('ZADD', KEYS[i], now, member)
      redis.call('PEXPIRE', KEYS[i], span)
    else
      redis.call('INCR', KEYS[i])
      redis.call('PEXPIREAT', KEYS[i], span)
    end
    counts[i] = counts[i] + 1
  end
end
local out = {admitted}
for i = 1, #KEYS do
  out[#out + 1] = counts[i]
  out[#out + 1] = resets[i]
end
return out
