-- Take the persistence of a finished run whose owner did not confirm it in time.
-- KEYS: run.  ARGV: holder, lease_ms.
-- Returns {'ok', now_ms, HGETALL of the run} (not due again for lease_ms), or
-- {'later', due_at} when it is not due yet, or {'none'} (no run, unfinished, or nothing
-- pending).
local run = KEYS[1]
local f = redis.call('HMGET', run, 'status', 'persist', 'persist_due_at')
if not f[1] or f[1] == 'running' or f[2] ~= 'pending' then
  return {'none'}
end
local now = now_ms()
if tonumber(f[3]) > now then
  return {'later', tonumber(f[3])}
end
redis.call('HSET', run, 'persist_due_at', int(now + tonumber(ARGV[2])), 'persist_by', ARGV[1])
return {'ok', int(now), redis.call('HGETALL', run)}
