-- Raise the cancel flag of an unfinished run.
-- KEYS: run.  Returns 1 when the run exists and is unfinished, else 0.
local run = KEYS[1]
if redis.call('HGET', run, 'status') ~= 'running' then
  return 0
end
redis.call('HSET', run, 'cancel_requested', '1')
return 1
