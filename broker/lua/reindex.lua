-- Keeps the index sets in step with the job hash, in the same atomic script: queued:<priority>
-- (queue position), deadlines, running (lease_until) and the inflight list that KEDA counts.
-- KEYS[1] is the job hash, KEYS[2..7] the indexes in INDEX_KEYS order (broker/jobstore/redis.py).
local KEY_PREFIX = '@PREFIX@'
local function reindex(id)
  local status = redis.call('HGET', KEYS[1], 'status')
  for i = 2, 4 do redis.call('ZREM', KEYS[i], id) end
  redis.call('ZREM', KEYS[7], id)
  if status == '"queued"' then
    local params = cjson.decode(redis.call('HGET', KEYS[1], 'params'))
    local created = tonumber(redis.call('HGET', KEYS[1], 'created_at')) or 0
    local slot = ({high = 2, normal = 3, low = 4})[params['priority']] or 3
    redis.call('ZADD', KEYS[slot], created, id)
    local deadline = params['queue_deadline_s']
    if type(deadline) == 'number' then redis.call('ZADD', KEYS[7], created + deadline, id) end
  end
  if status == '"running"' then
    redis.call('ZADD', KEYS[5], tonumber(redis.call('HGET', KEYS[1], 'lease_until')) or 0, id)
    if not redis.call('LPOS', KEYS[6], id) then redis.call('LPUSH', KEYS[6], id) end
  else
    redis.call('ZREM', KEYS[5], id)
    redis.call('LREM', KEYS[6], 0, id)
  end
  -- the tenant's in-flight set (derived from the hash, so not in KEYS: single-node Redis only)
  local active = KEY_PREFIX .. 'tenant:' .. cjson.decode(redis.call('HGET', KEYS[1], 'tenant')) .. ':active'
  if status == '"queued"' or status == '"running"' then
    redis.call('SADD', active, id)
  else
    redis.call('SREM', active, id)
  end
end
