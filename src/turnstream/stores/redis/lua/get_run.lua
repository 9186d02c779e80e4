-- The run's record with the server's time, so that lease_live is judged by the same clock
-- that wrote the expiry.
-- KEYS: run.  Returns {now_ms, HGETALL of the run}.
return {int(now_ms()), redis.call('HGETALL', KEYS[1])}
