-- Persist the run handle (JSON, stored as given); fenced.
-- KEYS: run.  ARGV: holder, token, handle.
-- Returns {'ok', lease expiry} or {refusal}.
local run = KEYS[1]
local refused = fence(run, ARGV[1], ARGV[2])
if refused then
  return {refused}
end
redis.call('HSET', run, 'handle', ARGV[3])
return {'ok', redis.call('HGET', run, 'lease_expires_at')}
