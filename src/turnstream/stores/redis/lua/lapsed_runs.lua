-- The lease index's members whose expiry is not after now: candidates for takeover.
-- Reads only the index (its own slot); the client checks each run's hash afterwards.
-- KEYS: leases.  ARGV: limit (> 0).
-- Returns {now_ms, {member, ...}}, oldest expiry first.
local now = now_ms()
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now), 'LIMIT', 0,
  tonumber(ARGV[1]))
return {int(now), members}
