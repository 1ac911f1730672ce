-- A tenant's submission limits (broker/jobstore/quota.py: Quota; its in-memory twin is over_rate).
-- quota(active set, this window's counter, the previous window's, cap (0: off), rate limit (0: off),
-- weight of the previous window, counter ttl, check the rate, count this submission) returns code,
-- active, previous, current: code 0 admitted (this window counted when `count`), -3 over the
-- in-flight cap, -4 over the rate (only when `check`); active -1 when the cap is off, previous and
-- current 0 when the rate is off. Refused: nothing is counted.
local function quota(active_key, now_key, previous_key, cap, limit, weight, ttl, check, count)
  local active, previous, current = -1, 0, 0
  if cap > 0 then
    active = redis.call('SCARD', active_key)
    if active >= cap then return -3, active, previous, current end
  end
  if limit > 0 then
    current = tonumber(redis.call('GET', now_key) or '0')
    previous = tonumber(redis.call('GET', previous_key) or '0')
    if check and previous * weight + current > limit - 1 then return -4, active, previous, current end
    if count then
      current = redis.call('INCR', now_key)
      redis.call('EXPIRE', now_key, ttl)
    end
  end
  return 0, active, previous, current
end
