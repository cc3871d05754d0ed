-- Helpers shared by every limiter script; limiter.py prepends this file to each one.
--
-- A bucket spec `b` is {scope, field, kind, capacity, period_ms, unit}:
--   scope     1 = the account's "*" hash, 2 = the account's per-model hash (KEYS order)
--   field     hash field prefix, e.g. "rpm"
--   kind      0 = continuously refilling bucket, 1 = daily window reset at the day boundary
--   capacity  the configured limit; a learned lower limit (field:cap) takes precedence
--   period_ms refill period of a rolling bucket (60000 for per-minute)
--   unit      what a job costs it: "requests" | "tokens" | "input" | "output"
-- Hash fields: field:l level and field:t its time (rolling); field:u used and field:w the
-- window number (daily); field:cap a limit learned from the provider's headers, or from a
-- 429 without them (then field:capt says when, and the limit recovers: RECOVER_MS).

local DAY_MS = 86400000
local KEEP_MS = 2 * DAY_MS  -- bucket hashes outlive any window they describe
-- A limit learned from a 429 without headers (field:cap with its time field:capt) climbs back
-- to the configured one at this pace: from half the limit in 5 minutes.
local RECOVER_MS = 600000

-- Now, in ms: Redis TIME plus the clock's offset; a stopped clock (tests) is its time plus the offset.
local function now_ms(spec)
  if type(spec.stopped_ms) == 'number' then return spec.stopped_ms + (spec.offset_ms or 0) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + (spec.offset_ms or 0)
end

local function num(x)
  return string.format('%.17g', x)
end

-- Each hash is read once per script (HGETALL) and served from memory after that; every write
-- goes through hset/hdel/hincr, which write through to that copy, so no hash is read twice.
local loaded = {}

local function hash(key)
  local h = loaded[key]
  if h == nil then
    h = {}
    local flat = redis.call('HGETALL', key)
    for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
    loaded[key] = h
  end
  return h
end

local function hget(key, field)
  return hash(key)[field]
end

local function hnum(key, field, default)
  local v = hash(key)[field]
  if v then return tonumber(v) end
  return default
end

local function hset(key, ...)
  local h, args = loaded[key], {...}
  if h ~= nil then
    for i = 1, #args, 2 do h[args[i]] = tostring(args[i + 1]) end
  end
  return redis.call('HSET', key, ...)
end

local function hdel(key, ...)
  local h, args = loaded[key], {...}
  if h ~= nil then
    for i = 1, #args do h[args[i]] = nil end
  end
  return redis.call('HDEL', key, ...)
end

local function hincr(key, field, by)
  local value = redis.call('HINCRBY', key, field, by)
  if loaded[key] ~= nil then loaded[key][field] = tostring(value) end
  return value
end

-- Keep a key at least `ms` longer (never shortens a longer TTL).
local function keep(key, ms)
  local ttl = redis.call('PTTL', key)
  if ttl >= 0 and ttl < ms then
    redis.call('PEXPIRE', key, math.ceil(ms))
  elseif ttl == -1 then
    redis.call('PEXPIRE', key, math.ceil(ms))
  end
end

-- Keep a hash at least `ms` longer (never shorter). Its field `keep_until` remembers the expiry
-- set last, so a hash written on every call costs a PEXPIRE once per `ms`, not a PTTL each time.
local function keep_hash(key, ms, now)
  if hnum(key, 'keep_until', 0) >= now + ms then return end
  hset(key, 'keep_until', num(now + 2 * ms))
  redis.call('PEXPIRE', key, math.ceil(2 * ms))
end

-- What a job costs an account in `unit`: its input estimate times the ratio of real to
-- estimated input tokens the account has learned (field in_ratio of its model hash; 1 until
-- a call has settled), so a tokenizer that counts unlike the estimate is reserved for right.
local function account_cost(costs, unit, model_key)
  local ratio = hnum(model_key, 'in_ratio', 1)
  if unit == 'input' then return costs.input * ratio end
  if unit == 'tokens' then return costs.tokens + costs.input * (ratio - 1) end
  return costs[unit]
end

-- The bucket now: (units available, effective capacity).
local function bucket_now(key, b, now, window)
  local field, kind, cap, period = b[2], b[3], b[4], b[5]
  local learned = hnum(key, field .. ':cap', nil)
  if learned then
    local since = hnum(key, field .. ':capt', nil)
    if since and now > since then learned = learned + (now - since) * cap / RECOVER_MS end
    if learned < cap then cap = learned end
  end
  if kind == 0 then
    local level = hnum(key, field .. ':l', nil)
    if level == nil then return cap, cap end
    local t = hnum(key, field .. ':t', now)
    if now > t then level = level + (now - t) * cap / period end
    if level > cap then level = cap end
    return level, cap
  end
  local used = 0
  if hnum(key, field .. ':w', -1) == window then used = hnum(key, field .. ':u', 0) end
  return cap - used, cap
end

-- Store what is available now (`avail`) for a bucket whose effective capacity is `cap`.
local function bucket_set(key, b, now, window, avail, cap)
  local field = b[2]
  if b[3] == 0 then
    hset(key, field .. ':l', num(avail), field .. ':t', num(now))
  else
    local used = cap - avail
    if used < 0 then used = 0 end
    hset(key, field .. ':u', num(used), field .. ':w', num(window))
  end
end

-- When a bucket that lacks `need` units can give them: refill time, or the next day window.
local function wait_for(b, avail, cap, need, now, next_reset)
  if avail >= need then return 0 end
  if b[3] == 0 then return (need - avail) * b[5] / cap end
  return next_reset - now
end
