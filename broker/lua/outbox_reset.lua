-- A redelivery: set the message's fields (pending again, no outcome), renew the ttl of the message
-- and of its attempt log (kept), and put it back in the pending index (scored now). KEYS: message
-- hash, attempts list, pending index. ARGV: ttl, message id, now (epoch s), then field/value pairs.
-- Returns 0 if the message does not exist.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('EXPIRE', KEYS[2], ARGV[1]) end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
return 1
