-- Classify a turn request (docs/lifecycle.md, turn modes) and, when fresh or taken over, lease the run.
-- KEYS: run, log, ids.
-- ARGV: input_hash, user_id, holder, lease_ms, begin_id, running_ttl_ms, reopen_failed ('1'/'0').
-- Returns {outcome, now_ms, HGETALL of the run}.
local run, log, ids = KEYS[1], KEYS[2], KEYS[3]
local input_hash, user_id, holder = ARGV[1], ARGV[2], ARGV[3]
local lease_ms, begin_id, ttl = tonumber(ARGV[4]), ARGV[5], ARGV[6]
local now = now_ms()

local function answer(outcome)
  return {outcome, int(now), redis.call('HGETALL', run)}
end

local f = redis.call('HMGET', run, 'status', 'input_hash', 'lease_holder', 'lease_expires_at',
  'begin_id', 'begin_outcome', 'user_id')

if not f[1] then
  -- The log and ids of an expired run expire with its record; clearing them anyway means a
  -- leftover can never make the first XADD 0-1 fail after the record was written.
  redis.call('DEL', log, ids)
  redis.call('HSET', run,
    'status', 'running', 'input_hash', input_hash, 'user_id', user_id,
    'attempt', '1', 'last_seq', '0', 'cancel_requested', '0', 'created_at', int(now),
    'lease_holder', holder, 'lease_token', '1', 'lease_expires_at', int(now + lease_ms),
    'begin_id', begin_id, 'begin_outcome', 'fresh')
  redis.call('PEXPIRE', run, ttl)
  return answer('fresh')
end

-- A begin that redis-py resent after losing the first reply must get the lease it was
-- granted, not see that lease as someone else's live one. A takeover since then would
-- have replaced begin_id.
if f[5] == begin_id and f[3] == holder then
  return answer(f[6])
end

-- Another input is refused before it can touch the lease (a lapsed run must not be leased
-- by a request the handler is about to turn away). user_id is who started the run, not
-- compared: a user's run has the user in its key, a shared run is every user's.
if f[2] ~= input_hash then
  return answer('mismatch')
end
if f[1] == 'failed' and ARGV[7] == '1' then
  -- A retry of a failed turn: running again, its log kept; the lease is taken below as in a
  -- takeover (the begin_id check above makes a resent reopen get the same lease).
  redis.call('HSET', run, 'status', 'running', 'cancel_requested', '0')
  redis.call('HDEL', run, 'final_text', 'finished_at', 'finished_by', 'persist',
    'persist_due_at')
elseif f[1] ~= 'running' then
  return answer('completed')
end
if f[1] == 'running' and f[3] and tonumber(f[4]) > now then
  return answer('live')
end

redis.call('HINCRBY', run, 'lease_token', 1)
redis.call('HSET', run, 'lease_holder', holder, 'lease_expires_at', int(now + lease_ms),
  'begin_id', begin_id, 'begin_outcome', 'takeover')
keep(ttl, run, log, ids)
return answer('takeover')
