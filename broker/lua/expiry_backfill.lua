-- Put one job into the expiry index if it is terminal and not there yet (records that ended before
-- retention existed were never indexed). Needs reindex.lua before it (expires_at, is_terminal).
-- KEYS[1] job hash, KEYS[2] expiry index; ARGV[1] id. Returns 1 if it was added.
if not is_terminal(redis.call('HGET', KEYS[1], 'status')) then return 0 end
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[2], expires_at(), ARGV[1])
return 1
