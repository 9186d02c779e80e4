-- Extend the lease to now + lease_ms, and the run's keys' TTL; fenced.
-- KEYS: run, log, ids.  ARGV: holder, token, lease_ms, running_ttl_ms.
-- Returns {'ok', cancel_requested ('1'/'0'), new expiry, has handle (1/0)} or {refusal}.
local run, log, ids = KEYS[1], KEYS[2], KEYS[3]
local refused = fence(run, ARGV[1], ARGV[2])
if refused then
  return {refused}
end
local expires_at = int(now_ms() + tonumber(ARGV[3]))
redis.call('HSET', run, 'lease_expires_at', expires_at)
keep(ARGV[4], run, log, ids)
return {'ok', redis.call('HGET', run, 'cancel_requested'), expires_at,
  redis.call('HEXISTS', run, 'handle')}
