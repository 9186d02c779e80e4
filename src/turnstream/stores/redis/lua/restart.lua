-- Start a new attempt of the run; fenced.
-- KEYS: run.  ARGV: holder, token, restart_id.
-- Returns {'ok', attempt} or {refusal}.
local run = KEYS[1]
local refused = fence(run, ARGV[1], ARGV[2])
if refused then
  return {refused}
end
-- A restart that redis-py resent after losing the first reply must not count twice.
if redis.call('HGET', run, 'restart_id') == ARGV[3] then
  return {'ok', tonumber(redis.call('HGET', run, 'attempt'))}
end
redis.call('HSET', run, 'restart_id', ARGV[3])
return {'ok', redis.call('HINCRBY', run, 'attempt', 1)}
