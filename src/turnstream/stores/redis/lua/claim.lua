-- Take over a run whose lease lapsed, with no input to check (the sweeper, a resume GET).
-- Never creates a run.
-- KEYS: run, log, ids.  ARGV: holder, lease_ms, claim_id, running_ttl_ms.
-- Returns {outcome, now_ms, HGETALL of the run}; outcome 'none' when there is no run.
local run, log, ids = KEYS[1], KEYS[2], KEYS[3]
local holder, lease_ms, claim_id = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local now = now_ms()

local function answer(outcome)
  return {outcome, int(now), redis.call('HGETALL', run)}
end

local f = redis.call('HMGET', run, 'status', 'lease_holder', 'lease_expires_at', 'begin_id',
  'begin_outcome')

if not f[1] then
  return {'none', int(now), {}}
end

-- As in begin.lua: a claim that redis-py resent after losing the first reply must get the
-- lease it was granted, not see it as someone else's live one. The claim shares begin_id
-- with begin, so a later begin or claim that took the lease replaces it, and a resent
-- older begin cannot mistake this claim's lease for its own either.
if f[4] == claim_id and f[2] == holder then
  return answer(f[5])
end

if f[1] ~= 'running' then
  return answer('completed')
end
if f[2] and tonumber(f[3]) > now then
  return answer('live')
end

redis.call('HINCRBY', run, 'lease_token', 1)
redis.call('HSET', run, 'lease_holder', holder, 'lease_expires_at', int(now + lease_ms),
  'begin_id', claim_id, 'begin_outcome', 'takeover')
keep(ARGV[4], run, log, ids)
return answer('takeover')
