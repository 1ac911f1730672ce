-- Set fields of an existing message and renew its ttl. KEYS: message hash. ARGV: ttl, then
-- field/value pairs. Returns 0 if the message does not exist (nothing written).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2)); redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
