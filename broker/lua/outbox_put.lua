-- Create a webhook message once and, with KEYS[2], add ARGV[2] (its id) to the job's delivery log
-- whether or not the message was new. KEYS: message hash[, job's message set]. ARGV: ttl, message id,
-- then field/value pairs. Returns 1 if created.
local created = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 3)); redis.call('EXPIRE', KEYS[1], ARGV[1]); created = 1
end
if KEYS[2] then redis.call('SADD', KEYS[2], ARGV[2]); redis.call('EXPIRE', KEYS[2], ARGV[1]) end
return created
