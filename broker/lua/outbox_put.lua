-- Create a webhook message once, in the pending index (KEYS[2], scored by ARGV[3], now: the relay
-- finds it there if its delivery is lost), and, with KEYS[3], add ARGV[2] (its id) to the job's
-- delivery log whether or not the message was new. KEYS: message hash, pending index[, job's message
-- set]. ARGV: ttl, message id, now (epoch s), then field/value pairs. Returns 1 if created.
local created = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 4)); redis.call('EXPIRE', KEYS[1], ARGV[1]); created = 1
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
end
if KEYS[3] then redis.call('SADD', KEYS[3], ARGV[2]); redis.call('EXPIRE', KEYS[3], ARGV[1]) end
return created
