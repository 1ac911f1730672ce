-- Reserve an Idempotency-Key: the value already there, or nothing after setting ARGV[1] with a ttl.
-- KEYS: the key. ARGV: value, ttl (s).
local current = redis.call('GET', KEYS[1])
if current then return current end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
