-- Extend the lease to now + lease_ms; fenced.
-- KEYS: run.  ARGV: holder, token, lease_ms.
-- Returns {'ok', cancel_requested ('1'/'0'), new expiry} or {refusal}.
local run = KEYS[1]
local refused = fence(run, ARGV[1], ARGV[2])
if refused then
  return {refused}
end
local expires_at = int(now_ms() + tonumber(ARGV[3]))
redis.call('HSET', run, 'lease_expires_at', expires_at)
return {'ok', redis.call('HGET', run, 'cancel_requested'), expires_at}
