-- Prepended to every script at load time (see _store.py): the one definition of the
-- store's clock and of the fence.

-- The Redis server's clock, in ms since the epoch. Lease expiry is judged by this one
-- clock, so workers whose own clocks are skewed still agree on who holds a lease.
-- Redis >= 5 replicates a script by its effects, which is what makes calling TIME before
-- a write legal; fakeredis implements TIME in scripts too.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Lua numbers are doubles: '%d' writes a seq or a ms timestamp as digits, never as 1.7e+12.
local function int(n)
  return string.format('%d', n)
end

-- An unfinished run is kept ttl ms after its last lease write (begin, claim, renew), its log
-- and dedup ids with it, so a run that nobody ever finishes cannot stay forever. PEXPIRE of
-- a key that does not exist yet is a no-op; append.lua gives a new log the run's TTL.
local function keep(ttl, run, log, ids)
  redis.call('PEXPIRE', run, ttl)
  redis.call('PEXPIRE', log, ttl)
  redis.call('PEXPIRE', ids, ttl)
end

-- nil when (holder, token) is the current lease of a running run, else the refusal.
-- The full lease value is compared, not just the token. The lease that finished the run
-- learns that the run is finished; any other stale lease that it lost the run.
local function fence(run, holder, token)
  local f = redis.call('HMGET', run, 'status', 'lease_holder', 'lease_token', 'finished_by')
  if not f[1] then
    return 'lease_lost'
  end
  if f[1] ~= 'running' and f[4] == holder and f[3] == token then
    return 'finished'
  end
  if f[2] ~= holder or f[3] ~= token then
    return 'lease_lost'
  end
  return nil
end

