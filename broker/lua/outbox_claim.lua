-- The message, locked (SET NX PX) only while pending. KEYS: message hash, lock. ARGV: token, lock
-- ttl (ms). Returns {locked (1/0), the hash's fields} ({0, {}} if there is no such message).
local f = redis.call('HGETALL', KEYS[1])
if #f == 0 then return {0, f} end
if redis.call('HGET', KEYS[1], 'state') == 'pending'
   and redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, f} end
return {0, f}
