-- Append events in order, deduplicated on eventId; fenced.
-- KEYS: run, log, ids.  ARGV: holder, token, then event id, type, data for each event.
-- Returns {'ok', {seq, ...}} or {refusal}.
local run, log, ids = KEYS[1], KEYS[2], KEYS[3]
local refused = fence(run, ARGV[1], ARGV[2])
if refused then
  return {refused}
end

-- The ids are looked up and recorded a chunk at a time (one HMGET, one HSET per chunk
-- rather than one of each per event: per-command overhead was most of a batch's Redis CPU).
-- A chunk stays far below unpack()'s limit on the number of values (LUAI_MAXCSTACK, 8000).
local CHUNK = 1000
local n = (#ARGV - 2) / 3

-- Every seq is planned before the first write: Lua does not roll back, so nothing may be
-- left to decide once writing has begun.
local seq = tonumber(redis.call('HGET', run, 'last_seq'))
local seqs, writes, planned = {}, {}, {}
for first = 0, n - 1, CHUNK do
  local last = math.min(first + CHUNK, n) - 1
  local names = {}
  for e = first, last do
    names[#names + 1] = ARGV[3 + 3 * e]
  end
  local known = redis.call('HMGET', ids, unpack(names))
  for e = first, last do
    local i = 3 + 3 * e
    local event_id = ARGV[i]
    -- `planned` catches an id repeated within this very batch.
    local seen = planned[event_id] or known[e - first + 1]
    if seen then
      seqs[#seqs + 1] = tonumber(seen)
    else
      seq = seq + 1
      planned[event_id] = seq
      seqs[#seqs + 1] = seq
      writes[#writes + 1] = i
    end
  end
end

if #writes > 0 then
  local pairs_ = {}
  for w, i in ipairs(writes) do
    local event_seq = int(planned[ARGV[i]])
    -- Entry id 0-<seq>: the stream id, the seq and the SSE id are one number.
    redis.call('XADD', log, '0-' .. event_seq, 'i', ARGV[i], 't', ARGV[i + 1], 'd', ARGV[i + 2])
    pairs_[#pairs_ + 1] = ARGV[i]
    pairs_[#pairs_ + 1] = event_seq
    if #pairs_ >= 2 * CHUNK or w == #writes then
      redis.call('HSET', ids, unpack(pairs_))
      pairs_ = {}
    end
  end
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
