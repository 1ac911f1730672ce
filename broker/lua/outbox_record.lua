-- Append a delivery attempt and bump the message's count. KEYS: message hash, attempts list.
-- ARGV: ttl, the attempt (JSON). Returns the new count (0: no such message).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1); redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[1]); redis.call('EXPIRE', KEYS[2], ARGV[1])
return n
