-- A redelivery: set the message's fields (pending again, no outcome) and renew the ttl of the
-- message and of its attempt log (kept). KEYS: message hash, attempts list. ARGV: ttl, then
-- field/value pairs. Returns 0 if the message does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('EXPIRE', KEYS[2], ARGV[1]) end
return 1
