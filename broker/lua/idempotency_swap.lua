-- Replace an Idempotency-Key's value only if it is still the expected one. KEYS: the key.
-- ARGV: expected, new value ('' deletes), ttl (s). Returns 1 if replaced.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
return 1
