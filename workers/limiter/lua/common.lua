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

-- Each hash is read once per script (HGETALL) and served from memory after that. Writes go to
-- that copy and are written back at the end of the script (`flush`): one HSET and one HDEL per
-- hash however many fields changed, then its PEXPIRE. Every script returns through `done`.
local loaded, dirty, dirty_order, expire_ms = {}, {}, {}, {}

local function changes(key)
  local d = dirty[key]
  if d == nil then
    d = {}
    dirty[key] = d
    dirty_order[#dirty_order + 1] = key
  end
  return d
end

local function hash(key)
  local h = loaded[key]
  if h == nil then
    h = {}
    local flat = redis.call('HGETALL', key)
    for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
    for f, v in pairs(dirty[key] or {}) do h[f] = v or nil end  -- written before it was read
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
  local h, d, args = loaded[key], changes(key), {...}
  for i = 1, #args, 2 do
    local v = tostring(args[i + 1])
    d[args[i]] = v
    if h ~= nil then h[args[i]] = v end
  end
end

local function hdel(key, ...)
  local h, d = loaded[key], changes(key)
  for _, f in ipairs({...}) do
    d[f] = false
    if h ~= nil then h[f] = nil end
  end
end

local function hincr(key, field, by)
  local value = hnum(key, field, 0) + by
  hset(key, field, value)
  return value
end

-- Write every changed hash back (see above); called once, by `done`.
local function flush()
  for _, key in ipairs(dirty_order) do
    local sets, dels = {}, {}
    for f, v in pairs(dirty[key]) do
      if v then
        sets[#sets + 1] = f
        sets[#sets + 1] = v
      else
        dels[#dels + 1] = f
      end
    end
    if #sets > 0 then redis.call('HSET', key, unpack(sets)) end
    if #dels > 0 then redis.call('HDEL', key, unpack(dels)) end
    if expire_ms[key] then redis.call('PEXPIRE', key, expire_ms[key]) end
  end
end

local function done(result)
  flush()
  return result
end

-- Keep a hash at least `ms` longer (never shorter). Its field `keep_until` remembers the expiry
-- set last, so a hash written on every call costs a PEXPIRE once per `ms`, not a PTTL each time.
local function keep_hash(key, ms, now)
  if hnum(key, 'keep_until', 0) >= now + ms then return end
  hset(key, 'keep_until', num(now + 2 * ms))
  expire_ms[key] = math.ceil(2 * ms)
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
