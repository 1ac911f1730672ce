-- Compare-and-set of one job (needs reindex.lua and checks.lua before it).
-- ARGV = id, then the checks (see checks.lua), then field/value pairs to set. Returns 1 if set.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local i = checks_hold(2)
if not i then return 0 end
if i <= #ARGV then
  redis.call('HSET', KEYS[1], unpack(ARGV, i, #ARGV))
  for j = i, #ARGV, 2 do
    if ARGV[j] == 'status' or ARGV[j] == 'lease_until' then reindex(ARGV[1]); break end
  end
end
return 1
