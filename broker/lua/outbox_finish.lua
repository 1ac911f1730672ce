-- One delivery attempt's end: outbox_record.lua, then HSET of ARGV[4..] on the message, then
-- outbox_unlock.lua with ARGV[3], in one step. KEYS: message hash, attempts list, lock. ARGV: ttl,
-- the attempt (JSON), lock token, field/value pairs. Returns the new attempt count (0: no such
-- message; the lock is released anyway).
local n = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  n = redis.call('HINCRBY', KEYS[1], 'attempts', 1); redis.call('RPUSH', KEYS[2], ARGV[2])
  if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
  redis.call('EXPIRE', KEYS[1], ARGV[1]); redis.call('EXPIRE', KEYS[2], ARGV[1])
end
if redis.call('GET', KEYS[3]) == ARGV[3] then redis.call('DEL', KEYS[3]) end
return n
