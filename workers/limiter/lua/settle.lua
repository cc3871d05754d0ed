-- settle: after the call, charge the real usage, refund the rest, release the lease, and
-- apply what the provider said (remaining/limit headers, a block, a disabled key).
-- The lease part happens once per lease: settling twice refunds nothing twice.
--
-- KEYS[1] "*" hash (buckets, blocks, circuit, disabled keys)   KEYS[2] model hash
-- KEYS[3] leases zset
-- ARGV[1] JSON {offset_ms, stopped_ms (tests only), day_shift_ms, lease_id,
--               charges = what acquire charged (its JSON, as it returned it), probe = 0 | 1,
--               known_ratio = the model's input ratio when the lease was taken,
--               actual = {requests, tokens, input, output} | null  (null: keep the charge),
--               outcome = "alive" | "failed" | "none"               (circuit breaker input),
--               circuit = {failures, probe_ms, cooldown_ms}: after `failures` failed calls
--                 in a row the account's circuit opens for probe_ms; then one call probes it,
--                 and each failed probe keeps it open 1.5 times longer, up to cooldown_ms,
--               block = {scope, ms, why} | null     (extends a block, never shortens it),
--               disable = {key_id, why} | null,
--               observe = [{bucket spec..., remaining, limit}],
--               input_ratio = real / estimated input tokens of this call | null (learned into
--                 the model hash's in_ratio, which later admissions multiply estimates by),
--               decrease = {factor, gap_ms} | null   a 429 the provider explained with no
--                 headers: each rolling bucket of the lease gets `factor` of its limit (at
--                 least what the job cost; at most once per gap_ms) and nothing left now }
-- Returns {lease settled now (1) or before (0), blocked_until_ms, now_ms,
--          1 if this call disabled the key (0 if it was disabled already or not asked),
--          1 if this call closed an open or half-open circuit (its provider is back),
--          when the circuit's next probe is due if this call was a probe that failed, else 0}

local spec = cjson.decode(ARGV[1])
local now = now_ms(spec)
local window = math.floor((now + spec.day_shift_ms) / DAY_MS)
local scopes = {KEYS[1], KEYS[2]}

local settled, recovered, reprobe_at = 0, 0, 0
if redis.call('ZREM', KEYS[3], spec.lease_id) == 1 then  -- once: a lease is removed once
  settled = 1
  local lease = {charges = cjson.decode(spec.charges), probe = spec.probe == 1}
  if type(spec.actual) == 'table' then
    for _, c in ipairs(lease.charges) do
      local delta = c[7] - spec.actual[c[6]]
      if delta ~= 0 and (c[3] == 0 or c[8] == window) then
        local key = scopes[c[1]]
        local avail, cap = bucket_now(key, c, now, window)
        avail = avail + delta
        if avail > cap then avail = cap end
        bucket_set(key, c, now, window, avail, cap)
      end
    end
  end
  if type(spec.decrease) == 'table' then
    for _, c in ipairs(lease.charges) do
      local key = scopes[c[1]]
      if c[3] == 0 and now - hnum(key, c[2] .. ':capt', 0) >= spec.decrease.gap_ms then
        local _, cap = bucket_now(key, c, now, window)
        local lower = math.max(c[7], cap * spec.decrease.factor)
        hset(key, c[2] .. ':cap', num(lower), c[2] .. ':capt', num(now))
        bucket_set(key, c, now, window, 0, lower)
      end
    end
  end
  local state = KEYS[1]
  if spec.outcome == 'alive' then
    recovered = hnum(state, 'open_until', 0) > 0 and 1 or 0
    for _, f in ipairs({'fails', 'open_until', 'probe_until', 'open_ms'}) do
      if hget(state, f) then hdel(state, f) end
    end
  elseif spec.outcome == 'failed' then
    local fails = hincr(state, 'fails', 1)
    local c = spec.circuit
    local step = nil
    if lease.probe then  -- the provider is still down: look again later, a little later each time
      step = math.min(math.max(hnum(state, 'open_ms', 0) * 1.5, c.probe_ms), c.cooldown_ms)
    elseif fails >= c.failures and hnum(state, 'open_until', 0) == 0 then  -- it opens now
      step = math.min(c.probe_ms, c.cooldown_ms)
    end  -- (a call admitted before it opened and failing now changes nothing)
    if step then
      hset(state, 'open_until', num(now + step), 'open_ms', num(step))
      hdel(state, 'probe_until')
      if lease.probe then reprobe_at = now + step end
    end
    keep_hash(state, c.cooldown_ms + KEEP_MS, now)
  elseif lease.probe then
    hdel(state, 'probe_until')
  end
end

local blocked_until = 0
if type(spec.block) == 'table' then
  local key = scopes[spec.block.scope]
  local until_ms = now + spec.block.ms
  blocked_until = hnum(key, 'blocked_until', 0)
  if until_ms > blocked_until then
    hset(key, 'blocked_until', num(until_ms), 'blocked_why', spec.block.why)
    blocked_until = until_ms
  end
  keep_hash(key, blocked_until - now + KEEP_MS, now)
end

if type(spec.input_ratio) == 'number' then
  -- from the ratio the lease was admitted with (the model hash is not read again for it; its
  -- TTL is kept by every debit)
  local ratio = tonumber(spec.known_ratio) or hnum(scopes[2], 'in_ratio', 1)
  local learned = ratio + 0.3 * (spec.input_ratio - ratio)  -- a moving average: a few calls
  learned = math.min(20, math.max(0.2, learned))
  if math.abs(learned - ratio) > 0.01 * ratio then
    if loaded[scopes[2]] or dirty[scopes[2]] then
      hset(scopes[2], 'in_ratio', num(learned))
    else
      redis.call('HSET', scopes[2], 'in_ratio', num(learned))
    end
  end
end

local newly_disabled = 0
if type(spec.disable) == 'table' then
  local field = 'off:' .. spec.disable.key_id
  if not hget(KEYS[1], field) then
    hset(KEYS[1], field, spec.disable.why)
    keep_hash(KEYS[1], KEEP_MS, now)
    newly_disabled = 1
  end
end

for _, o in ipairs(spec.observe or {}) do
  local key = scopes[o[1]]
  local limit = o[8]
  if type(limit) == 'number' and limit > 0 then
    if limit < o[4] then
      if hnum(key, o[2] .. ':cap', nil) ~= limit then hset(key, o[2] .. ':cap', num(limit)) end
    elseif hget(key, o[2] .. ':cap') then
      hdel(key, o[2] .. ':cap')
    end
    if hget(key, o[2] .. ':capt') then
      hdel(key, o[2] .. ':capt')  -- the provider said it: no guess to recover from
    end
  end
  local remaining = o[7]
  if type(remaining) == 'number' then
    local avail, cap = bucket_now(key, o, now, window)
    if remaining < avail then bucket_set(key, o, now, window, remaining, cap) end
  end
  keep_hash(key, KEEP_MS, now)
end

return done({settled, math.floor(blocked_until), now, newly_disabled, recovered, reprobe_at})
