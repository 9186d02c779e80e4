-- Append events in order, deduplicated on eventId; fenced.
-- KEYS: run, log, ids.  ARGV: holder, token, then event id, type, data for each event.
-- Returns {'ok', {seq, ...}} or {refusal}.
local run, log, ids = KEYS[1], KEYS[2], KEYS[3]
local refused = fence(run, ARGV[1], ARGV[2])
if refused then
  return {refused}
end

-- Every seq is planned before the first write: Lua does not roll back, so nothing may be
-- left to decide once writing has begun.
local seq = tonumber(redis.call('HGET', run, 'last_seq'))
local seqs, writes, planned = {}, {}, {}
for i = 3, #ARGV, 3 do
  local event_id = ARGV[i]
  -- `planned` catches an id repeated within this very batch.
  local known = planned[event_id] or redis.call('HGET', ids, event_id)
  if known then
    seqs[#seqs + 1] = tonumber(known)
  else
    seq = seq + 1
    planned[event_id] = seq
    seqs[#seqs + 1] = seq
    writes[#writes + 1] = i
  end
end

for _, i in ipairs(writes) do
  local event_seq = int(planned[ARGV[i]])
  -- Entry id 0-<seq>: the stream id, the seq and the SSE id are one number.
  redis.call('XADD', log, '0-' .. event_seq, 'i', ARGV[i], 't', ARGV[i + 1], 'd', ARGV[i + 2])
  redis.call('HSET', ids, ARGV[i], event_seq)
end
if #writes > 0 then
  if tonumber(redis.call('HGET', run, 'last_seq')) == 0 then
    -- The first entries create the log and the ids: they expire with the run.
    local ttl = redis.call('PTTL', run)
    if ttl > 0 then
      redis.call('PEXPIRE', log, ttl)
      redis.call('PEXPIRE', ids, ttl)
    end
  end
  redis.call('HSET', run, 'last_seq', int(seq))
end
return {'ok', seqs}
