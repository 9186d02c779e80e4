-- Let the lease lapse now, if (holder, token) is still the current lease; else do nothing.
-- The expiry becomes now, not 0: a local run's orphan grace counts from the release.
-- KEYS: run.  ARGV: holder, token.
-- Returns {released (1/0), has handle (1/0), expiry}.
local run = KEYS[1]
local f = redis.call('HMGET', run, 'lease_holder', 'lease_token')
if f[1] == ARGV[1] and f[2] == ARGV[2] then
  local now = int(now_ms())
  redis.call('HSET', run, 'lease_expires_at', now)
  return {1, redis.call('HEXISTS', run, 'handle'), now}
end
return {0, 0, 0}
