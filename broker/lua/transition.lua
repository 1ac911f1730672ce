-- cas.lua, returning the whole job (HGETALL) so a transition is one round trip, and LPUSHing ARGV[2]
-- onto KEYS[8] when it is not empty (a message that must go with the move). ARGV = id, message, then
-- as cas.lua. Needs reindex.lua and checks.lua before it.
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local i = checks_hold(3)
if not i then return false end
if i <= #ARGV then
  redis.call('HSET', KEYS[1], unpack(ARGV, i, #ARGV))
  reindex(ARGV[1])
end
if ARGV[2] ~= '' then redis.call('LPUSH', KEYS[8], ARGV[2]) end
return redis.call('HGETALL', KEYS[1])
