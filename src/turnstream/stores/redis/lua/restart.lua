-- Start a new attempt of the run; fenced, and once per lease.
-- KEYS: run.  ARGV: holder, token.
-- Returns {'ok', attempt} or {refusal}.
local run = KEYS[1]
local refused = fence(run, ARGV[1], ARGV[2])
if refused then
  return {refused}
end
-- A lease restarts its run at most once: a resend (redis-py's after a lost reply, or the
-- pump's own retry) answers with the attempt the first call began. The fencing token names
-- the lease, since every takeover increments it.
if redis.call('HGET', run, 'restarted_by') == ARGV[2] then
  return {'ok', tonumber(redis.call('HGET', run, 'attempt'))}
end
redis.call('HSET', run, 'restarted_by', ARGV[2])
return {'ok', redis.call('HINCRBY', run, 'attempt', 1)}
