-- The persistence hook of a finished run succeeded.
-- KEYS: run.  Returns 1 when a pending persistence was cleared, else 0.
local run = KEYS[1]
if redis.call('HGET', run, 'persist') ~= 'pending' then
  return 0
end
redis.call('HSET', run, 'persist', 'done')
redis.call('HDEL', run, 'persist_due_at')
return 1
