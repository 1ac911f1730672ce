-- Record a new job (needs reindex.lua before it). ARGV = id, created_at, then field/value pairs;
-- KEYS[8] is the tenant's job list. Returns 0 if the id is taken (nothing written).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3, #ARGV))
redis.call('ZADD', KEYS[8], ARGV[2], ARGV[1])
reindex(ARGV[1])
return 1
