-- acquire: check and debit every bucket of one account at once (all or none) and take a
-- concurrency lease; among several accounts (keys) take the one with the most room left.
--
-- KEYS[1]  disabled keys hash      key_id -> why
-- KEYS[2]  pending hash            "<model>|<unit>" -> work queued for this provider
-- KEYS[3]  lease record            string, created here (JSON of what was charged)
-- KEYS[4+4(i-1) .. 7+4(i-1)]  for account i: "*" hash, model hash, leases zset, state hash
-- ARGV[1]  JSON {offset_ms, stopped_ms (tests only), day_shift_ms, lease_id, lease_ttl_ms,
--                probe_ttl_ms, share,
--                costs = {requests, tokens, input, output}, dequeue = {field: amount} | null,
--                accounts = [{key_id, concurrency, buckets = [bucket spec, ...]}]}
-- Returns  {1, account index (1-based), now_ms, crossed}   the lease is taken; `crossed` lists
--                                                 "field:used:limit" of daily quotas this debit
--                                                 took past ALERT_AT (90%) — once per window
--          {0, wait_ms, why, now_ms}              nothing admits now; earliest retry in wait_ms
--                                                 (why "never:<reason>" when waiting cannot help;
--                                                 Limiter.acquire turns it into Wait.never)

local spec = cjson.decode(ARGV[1])
local now = now_ms(spec)
local window = math.floor((now + spec.day_shift_ms) / DAY_MS)
local next_reset = (window + 1) * DAY_MS - spec.day_shift_ms
local NEVER = 1e15

if type(spec.dequeue) == 'table' then
  for field, amount in pairs(spec.dequeue) do
    local left = hnum(KEYS[2], field, 0) - amount
    if left <= 0 then hdel(KEYS[2], field) else hset(KEYS[2], field, num(left)) end
  end
end

local best, best_room, best_probe = nil, nil, false
local soonest, soonest_why = nil, 'never:no usable key'

for i, acct in ipairs(spec.accounts) do
  local base = 3 + (i - 1) * 4
  local scopes = {KEYS[base + 1], KEYS[base + 2]}
  local leases, state = KEYS[base + 3], KEYS[base + 4]
  local wait, why, room, probe = 0, nil, 1e18, false

  local function worse(w, reason)
    if w > wait then wait, why = w, reason end
  end

  if hget(KEYS[1], acct.key_id) then
    worse(NEVER, 'never:key disabled: ' .. hget(KEYS[1], acct.key_id))
  end
  for s = 1, 2 do
    local until_ms = hnum(scopes[s], 'blocked_until', 0)
    if until_ms > now then
      worse(until_ms - now, 'blocked: ' .. (hget(scopes[s], 'blocked_why') or '?'))
    end
  end
  local open_until = hnum(state, 'open_until', 0)
  if open_until > now then
    worse(open_until - now, 'circuit open')
  elseif open_until > 0 then
    local probe_until = hnum(state, 'probe_until', 0)
    if probe_until > now then worse(probe_until - now, 'circuit half-open: probe in flight') end
    probe = true
  end
  if acct.concurrency > 0 then
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
    if redis.call('ZCARD', leases) >= acct.concurrency then
      local first = redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')
      worse(math.max(1, math.min(tonumber(first[2]) - now, 250)), 'concurrency')
    end
  end
  for _, b in ipairs(acct.buckets) do
    local avail, cap = bucket_now(scopes[b[1]], b, now, window)
    local cost = spec.costs[b[6]]
    local reserve = (1 - spec.share) * cap
    if cost > cap - reserve then
      worse(NEVER, 'never:one job needs ' .. cost .. ' of ' .. b[2] .. ' but the limit is ' .. cap)
    else
      worse(wait_for(b, avail - reserve, cap, cost, now, next_reset), b[2])
      local r = (avail - reserve - cost) / cap
      if r < room then room = r end
    end
  end

  if wait <= 0 then
    if best == nil or room > best_room then best, best_room, best_probe = i, room, probe end
  elseif soonest == nil or wait < soonest then
    soonest, soonest_why = wait, why
  end
end

if best == nil then
  return {0, math.ceil(soonest or NEVER), soonest_why, now}
end

local acct = spec.accounts[best]
local base = 3 + (best - 1) * 4
local scopes = {KEYS[base + 1], KEYS[base + 2]}
local ALERT_AT = 0.9
local charges, crossed = {}, {}
for _, b in ipairs(acct.buckets) do
  local key = scopes[b[1]]
  local avail, cap = bucket_now(key, b, now, window)
  local cost = spec.costs[b[6]]
  bucket_set(key, b, now, window, avail - cost, cap)
  charges[#charges + 1] = {b[1], b[2], b[3], b[4], b[5], b[6], cost, window}
  local used_before, used_after = cap - avail, cap - avail + cost
  if b[3] == 1 and used_before < ALERT_AT * cap and used_after >= ALERT_AT * cap then
    crossed[#crossed + 1] = b[2] .. ':' .. used_after .. ':' .. cap
  end
end
for s = 1, 2 do keep(scopes[s], KEEP_MS) end
local expires = now + spec.lease_ttl_ms
redis.call('ZADD', KEYS[base + 3], expires, spec.lease_id)
keep(KEYS[base + 3], spec.lease_ttl_ms)
if best_probe then
  hset(KEYS[base + 4], 'probe_until', num(now + spec.probe_ttl_ms))
end
redis.call('SET', KEYS[3], cjson.encode({charges = charges, probe = best_probe}), 'PX', spec.lease_ttl_ms)
return {1, best, now, crossed}
