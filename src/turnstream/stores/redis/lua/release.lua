-- Let the lease lapse now, if (holder, token) is still the current lease; else do nothing.
-- KEYS: run.  ARGV: holder, token.
local run = KEYS[1]
local f = redis.call('HMGET', run, 'lease_holder', 'lease_token')
if f[1] == ARGV[1] and f[2] == ARGV[2] then
  redis.call('HSET', run, 'lease_expires_at', '0')
  return 1
end
return 0
