-- create.lua, then LPUSH of the job's Celery message onto KEYS[9] and the job's place in its model's
-- strict-priority render order (reindex.lua's model_keys: queued high, normal, low), in one round trip; first the
-- tenant's submission limits (quota.lua), checked and counted in the same atomic step. Needs
-- reindex.lua and quota.lua before it.
-- KEYS[10] is the tenant's active set, KEYS[11..12] this and the previous rate window's counters,
-- KEYS[13] the submission's Idempotency-Key (broker/jobstore/claim.py; any key when there is none).
-- ARGV = id, created_at, message, max in flight (0: off), rate limit (0: off), weight of the previous
-- window, counter ttl, '1' to check the rate, '1' to count this submission toward it, the
-- field/value pairs as one JSON array of strings (one argument, not ~50: redis-py packs each
-- argument in Python), then the key's held value ('': no key), its value naming the job, its ttl.
-- Returns {position (-2: not queued), active, previous, current, key pointed (1/0)}, {-1} if the
-- id is taken, {-3, active} over the in-flight cap, {-4, active, previous, current} over the rate:
-- nothing is written in those three cases. A Lua script is not rolled back when a command fails, so
-- what could fail (a wrong-type key) is checked before the first write: all or nothing.
if redis.call('EXISTS', KEYS[1]) == 1 then return {-1} end
local kind = redis.call('TYPE', KEYS[9])['ok']
if kind ~= 'list' and kind ~= 'none' then return redis.error_reply('WRONGTYPE the queue key is a ' .. kind) end
local claim = ARGV[11] ~= ''
if claim then
  local key_kind = redis.call('TYPE', KEYS[13])['ok']
  if key_kind ~= 'string' and key_kind ~= 'none' then
    return redis.error_reply('WRONGTYPE the idempotency key is a ' .. key_kind)
  end
end
local cap = tonumber(ARGV[4])
local code, active, previous, current = quota(KEYS[10], KEYS[11], KEYS[12], cap, tonumber(ARGV[5]),
                                              tonumber(ARGV[6]), ARGV[7], ARGV[8] == '1', ARGV[9] == '1')
if code == -3 then return {-3, active} end
if code == -4 then return {-4, active, previous, current} end
redis.call('HSET', KEYS[1], unpack(cjson.decode(ARGV[10])))
redis.call('ZADD', KEYS[8], ARGV[2], ARGV[1])
reindex(ARGV[1])
redis.call('LPUSH', KEYS[9], ARGV[3])
local pointed = 0
if claim and redis.call('GET', KEYS[13]) == ARGV[11] then
  redis.call('SET', KEYS[13], ARGV[12], 'EX', ARGV[13])
  pointed = 1
end
if cap > 0 then active = active + 1 end
local ahead = 0
local mine = model_keys()
for i = 1, 3 do
  local rank = redis.call('ZRANK', mine[i], ARGV[1])
  if rank then return {ahead + rank, active, previous, current, pointed} end
  ahead = ahead + redis.call('ZCARD', mine[i])
end
return {-2, active, previous, current, pointed}
