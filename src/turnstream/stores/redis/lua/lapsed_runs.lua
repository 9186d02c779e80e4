-- Members of one sweeper index whose score is not after now - offset_ms: the lease index
-- (score: lease expiry) or the persistence index (score: when it is due).
-- Reads only the index (its own slot); the client checks each run's hash afterwards.
-- KEYS: index.  ARGV: limit (> 0), offset_ms (>= 0).
-- Returns {now_ms, {member, ...}}, lowest score first.
local now = now_ms()
local members = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', int(now - tonumber(ARGV[2])),
  'LIMIT', 0, tonumber(ARGV[1]))
return {int(now), members}
