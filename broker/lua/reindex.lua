-- Keeps the index sets in step with the job hash, in the same atomic script: the job's model's
-- queued:<model>:<priority> (queue position) and inflight:<model> (what its KEDA scaler counts),
-- deadlines and running (lease_until, every model).
-- KEYS[1] is the job hash, KEYS[2..7] the indexes in INDEX_KEYS order (broker/jobstore/redis.py):
-- KEYS[2..4] and KEYS[6] are the legacy model's queued sets and inflight list.
local KEY_PREFIX = '@PREFIX@'
-- broker.keys.LEGACY_MODEL: its keys keep their pre-fleet names (KEYS[2..4], KEYS[6])
local LEGACY_MODEL = 'default'
-- The job's model's {queued high, normal, low, inflight} (derived from the hash, so not in KEYS:
-- single-node Redis only, like the tenant's active set below); the same names as broker/keys.py.
local function model_keys()
  local params = cjson.decode(redis.call('HGET', KEYS[1], 'params') or 'null')
  local model = type(params) == 'table' and params['model']
  if type(model) ~= 'string' or model == LEGACY_MODEL then
    return {KEYS[2], KEYS[3], KEYS[4], KEYS[6]}
  end
  local queued = KEY_PREFIX .. 'queued:' .. model .. ':'
  return {queued .. 'high', queued .. 'normal', queued .. 'low', KEY_PREFIX .. 'inflight:' .. model}
end
-- broker.retention.DEFAULT_JOB_RETENTION_S: for a job whose params carry no retention_s (the API
-- always writes one; records from before retention existed do not)
local DEFAULT_RETENTION_S = 604800
-- Epoch seconds after which a terminal job may leave Redis (lua/sweep_job.lua): finished_at (else
-- created_at) + params.retention_s.
local function expires_at()
  local params = cjson.decode(redis.call('HGET', KEYS[1], 'params') or 'null')
  local retention = type(params) == 'table' and params['retention_s']
  if type(retention) ~= 'number' then retention = DEFAULT_RETENTION_S end
  local finished = tonumber(redis.call('HGET', KEYS[1], 'finished_at'))
    or tonumber(redis.call('HGET', KEYS[1], 'created_at')) or 0
  return finished + retention
end
local function is_terminal(status)
  return status == '"succeeded"' or status == '"failed"' or status == '"canceled"'
end
local function reindex(id)
  local status = redis.call('HGET', KEYS[1], 'status')
  local mine = model_keys()
  for i = 1, 3 do redis.call('ZREM', mine[i], id) end
  redis.call('ZREM', KEYS[7], id)
  if status == '"queued"' then
    local params = cjson.decode(redis.call('HGET', KEYS[1], 'params'))
    local created = tonumber(redis.call('HGET', KEYS[1], 'created_at')) or 0
    local slot = ({high = 1, normal = 2, low = 3})[params['priority']] or 2
    redis.call('ZADD', mine[slot], created, id)
    local deadline = params['queue_deadline_s']
    if type(deadline) == 'number' then redis.call('ZADD', KEYS[7], created + deadline, id) end
  end
  if status == '"running"' then
    redis.call('ZADD', KEYS[5], tonumber(redis.call('HGET', KEYS[1], 'lease_until')) or 0, id)
    if not redis.call('LPOS', mine[4], id) then redis.call('LPUSH', mine[4], id) end
  else
    redis.call('ZREM', KEYS[5], id)
    redis.call('LREM', mine[4], 0, id)
  end
  -- the tenant's in-flight set (derived from the hash, so not in KEYS: single-node Redis only)
  local active = KEY_PREFIX .. 'tenant:' .. cjson.decode(redis.call('HGET', KEYS[1], 'tenant')) .. ':active'
  if status == '"queued"' or status == '"running"' then
    redis.call('SADD', active, id)
  else
    redis.call('SREM', active, id)
  end
  -- terminal jobs wait in the expiry index, by when they may go, so a sweep reads only the due ones
  -- (derived key, as above)
  if is_terminal(status) then
    redis.call('ZADD', KEY_PREFIX .. 'expiry', expires_at(), id)
  else
    redis.call('ZREM', KEY_PREFIX .. 'expiry', id)
  end
end
