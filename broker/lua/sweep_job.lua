-- Delete one terminal job whose retention has ended: its hash, its places in every index, the
-- tenant's job list and the expiry index, and its finished webhook messages (a message still pending
-- delivery keeps its own TTL, and so does the job's delivery-log set while it holds one). Needs
-- reindex.lua before it (expires_at, is_terminal). The status and the deadline are checked again here,
-- in the same atomic step as the deletion, so a job that a concurrent transition made live again
-- (a retry) is never deleted.
-- KEYS[1] job hash, KEYS[2..7] INDEX_KEYS, KEYS[8] expiry index, KEYS[9] the job's message set.
-- ARGV = id, now (epoch s), notify grace (s), retry delay (s). Returns 1 deleted, 0 no such job,
-- -1 not terminal, -2 not due yet (its place in the expiry index is corrected: dropped, or moved to
-- its real deadline), -3 its terminal webhook is not stored yet (tried again after the retry delay).
local id, now = ARGV[1], tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[8], id)
  return 0
end
if not is_terminal(redis.call('HGET', KEYS[1], 'status')) then
  redis.call('ZREM', KEYS[8], id)
  return -1
end
local due = expires_at()
if due > now then
  redis.call('ZADD', KEYS[8], due, id)
  return -2
end
-- The notify task builds a job's terminal webhook from the record: a job that asked for a webhook
-- stays until that message is stored (its id as workers.webhooks.message_id_for makes it), for at
-- most the notify grace after it finished (past it the message may have expired on its own TTL).
local params = cjson.decode(redis.call('HGET', KEYS[1], 'params') or 'null')
if type(params) == 'table' and type(params['webhook']) == 'string' then
  local message = 'msg_' .. id .. '_job_' .. cjson.decode(redis.call('HGET', KEYS[1], 'status'))
  local finished = tonumber(redis.call('HGET', KEYS[1], 'finished_at')) or 0
  if redis.call('SISMEMBER', KEYS[9], message) == 0 and redis.call('EXISTS', KEY_PREFIX .. 'webhook:' .. message) == 0
      and now - finished < tonumber(ARGV[3]) then
    redis.call('ZADD', KEYS[8], now + tonumber(ARGV[4]), id)
    return -3
  end
end
local tenant = cjson.decode(redis.call('HGET', KEYS[1], 'tenant'))
local mine = model_keys()
for i = 1, 3 do redis.call('ZREM', mine[i], id) end
redis.call('ZREM', KEYS[5], id)
redis.call('LREM', mine[4], 0, id)
redis.call('ZREM', KEYS[7], id)
redis.call('SREM', KEY_PREFIX .. 'tenant:' .. tenant .. ':active', id)
redis.call('ZREM', KEY_PREFIX .. 'tenant:' .. tenant .. ':jobs', id)
local kept = 0
for _, message in ipairs(redis.call('SMEMBERS', KEYS[9])) do
  local message_key = KEY_PREFIX .. 'webhook:' .. message
  if redis.call('HGET', message_key, 'state') == 'pending' then
    kept = kept + 1
  else
    redis.call('DEL', message_key, message_key .. ':attempts', message_key .. ':lock')
  end
end
if kept == 0 then redis.call('DEL', KEYS[9]) end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[8], id)
return 1
