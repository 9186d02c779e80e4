-- Checkpoint the final text, append the terminal event, release the lease and start the
-- retention clock, all at once; fenced, and idempotent for the lease that finished the run.
-- KEYS: run, log, ids.
-- ARGV: holder, token, status, event id, type, data, has_final_text ('1'/'0'), final_text,
--       retention_ms, persist_after_ms ('' when nothing is to be persisted).
-- Returns {'ok', terminal seq, persistence due at (ms, 0 when none)} or {refusal}.
local run, log, ids = KEYS[1], KEYS[2], KEYS[3]
local holder, token = ARGV[1], ARGV[2]

local f = redis.call('HMGET', run, 'status', 'lease_token', 'finished_by', 'last_seq',
  'persist', 'persist_due_at')
if f[1] and f[1] ~= 'running' and f[3] == holder and f[2] == token then
  -- A retried finish: same answer, nothing written.
  local due = 0
  if f[5] == 'pending' then
    due = tonumber(f[6])
  end
  return {'ok', tonumber(f[4]), due}
end
local refused = fence(run, holder, token)
if refused then
  return {refused}
end

local now = now_ms()
local seq = int(tonumber(f[4]) + 1)
redis.call('XADD', log, '0-' .. seq, 'i', ARGV[4], 't', ARGV[5], 'd', ARGV[6])
redis.call('HSET', run, 'status', ARGV[3], 'last_seq', seq, 'finished_at', int(now),
  'finished_by', holder, 'lease_expires_at', '0')
redis.call('HDEL', run, 'lease_holder')
if ARGV[7] == '1' then
  redis.call('HSET', run, 'final_text', ARGV[8])
else
  redis.call('HDEL', run, 'final_text')
end
local due = 0
if ARGV[10] ~= '' then
  due = now + tonumber(ARGV[10])
  redis.call('HSET', run, 'persist', 'pending', 'persist_due_at', int(due))
end
-- Nothing is appended after the terminal event, so the dedup index has served its purpose.
redis.call('DEL', ids)
redis.call('PEXPIRE', run, ARGV[9])
redis.call('PEXPIRE', log, ARGV[9])
return {'ok', tonumber(seq), due}
