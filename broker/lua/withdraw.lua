-- Undo a create (create_and_enqueue.lua) that too few replicas acknowledged, if no worker has seen
-- it yet: the job is still queued and its Celery message (ARGV[2]) is still on the list KEYS[9].
-- Then the message, the hash, its index entries (reindex.lua, as for a job that ended), its
-- place in the tenant's list (KEYS[8]) and the Idempotency-Key the create pointed at it (KEYS[10],
-- deleted only if it still holds ARGV[3]; ARGV[3] '': no key) go. Returns 1 if withdrawn, 0 if the
-- job stays (taken; its key, if any, keeps naming it). Needs reindex.lua before it.
-- ARGV = id, message, the key's value naming the job.
if redis.call('HGET', KEYS[1], 'status') ~= '"queued"' then return 0 end
if redis.call('LREM', KEYS[9], 1, ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', '"canceled"')
reindex(ARGV[1])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[8], ARGV[1])
if ARGV[3] ~= '' and redis.call('GET', KEYS[10]) == ARGV[3] then redis.call('DEL', KEYS[10]) end
return 1
