-- A tenant's limits without a create (needs quota.lua before it): the API's check before a body is
-- read, a read of the rate's headroom, or a count toward it. KEYS: the tenant's active set, this
-- window's counter, the previous window's. ARGV: cap, rate limit, weight of the previous window,
-- counter ttl, '1' to check the rate, '1' to count. Returns {code, active, previous, current} (quota.lua).
local code, active, previous, current = quota(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]), tonumber(ARGV[2]),
                                              tonumber(ARGV[3]), ARGV[4], ARGV[5] == '1', ARGV[6] == '1')
return {code, active, previous, current}
