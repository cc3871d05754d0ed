-- acquire: check and debit every bucket of one account at once (all or none) and take a
-- concurrency lease; among several accounts (keys) take the one with the most room left.
-- Or, with `reserve_ms`, reserve: debit the account whose budget is back soonest now, for a
-- call at the time it is back (`ready_at`), so a job that must wait is given its time once
-- and every later job sees the budget gone. A reserved job redeems its reservation here
-- (`reservation`): the lease is taken without a second debit.
--
-- KEYS[1]  pending hash            "<model>|<unit>" -> work queued for this provider
-- KEYS[2+3(i-1) .. 4+3(i-1)]  for account i: "*" hash (its buckets, blocks, circuit and
--                             disabled keys "off:<key_id>"), model hash, leases zset
-- KEYS[2+3n]  reservation record   (n accounts; only with `reserve_ms` or `reservation`)
-- ARGV[1]  JSON {offset_ms, stopped_ms (tests only), day_shift_ms, lease_id, lease_ttl_ms,
--                probe_ttl_ms, probe_recheck_ms (how soon a job behind a probe looks again), share,
--                costs = {requests, tokens, input, output}, dequeue = {field: amount} | null,
--                accounts = [{key_id, concurrency, buckets = [bucket spec, ...]}],
--                margin_ms                       a wait for a refill is this much longer
--                                                (slack for the provider's clock)
--                reserve_ms = horizon | null     reserve only what is back within it
--                reservation = true | null       redeem the record at KEYS[4+4n]
--                release = true | null           with `reservation`: give it back unused
--                stale_ms                        a reservation redeemed later than this is
--                                                refunded and the job admitted afresh}
-- Returns  {1, account index (1-based), now_ms, crossed, charges, probe, in_ratio}   the lease;
--                                                 `crossed` lists "field:used:limit" of daily
--                                                 quotas this debit took past ALERT_AT (90%),
--                                                 once per window; `charges` (JSON), `probe`
--                                                 and the model's input ratio go back to settle
--                                                 with the lease
--          {2, account index, ready_at_ms, now_ms}   reserved: call at ready_at_ms, not before
--          {3, 1 | 0, 'released', now_ms}        `release`: given back (1), or nothing was there
--          {0, wait_ms, why, now_ms}              nothing admits (or reserves) now; earliest retry
--                                                 in wait_ms (why "never:<reason>" when waiting
--                                                 cannot help; Limiter turns it into Wait.never)

local spec = cjson.decode(ARGV[1])
local now = now_ms(spec)
local window = math.floor((now + spec.day_shift_ms) / DAY_MS)
local next_reset = (window + 1) * DAY_MS - spec.day_shift_ms
local NEVER = 1e15
local ALERT_AT = 0.9
local PENDING = KEYS[1]
local RESERVATION = KEYS[2 + 3 * #spec.accounts]
local reserving = type(spec.reserve_ms) == 'number'

if type(spec.dequeue) == 'table' then
  for field, amount in pairs(spec.dequeue) do
    local left = hnum(PENDING, field, 0) - amount
    if left <= 0 then hdel(PENDING, field) else hset(PENDING, field, num(left)) end
  end
end

local function keys_of(i)
  local base = 1 + (i - 1) * 3
  return {KEYS[base + 1], KEYS[base + 2]}, KEYS[base + 3]
end

-- What keeps account i from a call now, budget aside: (wait_ms, why, probe). A reservation
-- does not look at concurrency: that is checked when it is redeemed.
local function gate(i, acct, with_concurrency)
  local scopes, leases = keys_of(i)
  local state = scopes[1]
  local wait, why, probe = 0, nil, false
  local function worse(w, reason)
    if w > wait then wait, why = w, reason end
  end
  local off = hget(state, 'off:' .. acct.key_id)
  if off then worse(NEVER, 'never:key disabled: ' .. off) end
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
    -- a job behind a probe in flight looks again soon (a probe usually takes a call's time),
    -- not at the end of the probe's long lease
    if probe_until > now then
      worse(math.min(probe_until - now, spec.probe_recheck_ms), 'circuit half-open: probe in flight')
    end
    probe = true
  end
  if with_concurrency and acct.concurrency > 0 then
    -- leases past their time (a worker that died) do not count; take_lease prunes them daily
    if redis.call('ZCOUNT', leases, '(' .. num(now), '+inf') >= acct.concurrency then
      local first = redis.call('ZRANGEBYSCORE', leases, '(' .. num(now), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
      worse(math.max(1, math.min(tonumber(first[2]) - now, 250)), 'concurrency')
    end
  end
  return wait, why, probe
end

-- What account i's budget lacks for this job: (wait_ms, why, room, daily) — `daily`: a daily
-- window is what lacks (only its reset helps: nothing to reserve within a horizon).
local function budget(i, acct)
  local scopes = keys_of(i)
  local wait, why, room, daily = 0, nil, 1e18, false
  for _, b in ipairs(acct.buckets) do
    local avail, cap = bucket_now(scopes[b[1]], b, now, window)
    local cost = account_cost(spec.costs, b[6], scopes[2])
    local reserve = (1 - spec.share) * cap
    if cost > cap - reserve then
      return NEVER, 'never:one job needs ' .. cost .. ' of ' .. b[2] .. ' but the limit is ' .. cap, room, false
    end
    local w = wait_for(b, avail - reserve, cap, cost, now, next_reset)
    -- a job that waits for a refill waits a little longer, so it never reaches the provider
    -- a few ms before its token (the provider's clock is not ours)
    if w > 0 and b[3] == 0 then w = w + spec.margin_ms end
    if w > 0 and b[3] == 1 then daily = true end
    if w > wait then wait, why = w, b[2] end
    local r = (avail - reserve - cost) / cap
    if r < room then room = r end
  end
  return wait, why, room, daily
end

-- Debit every bucket of account i by the job's costs; returns (charges, crossed).
local function debit(i, acct)
  local scopes = keys_of(i)
  local charges, crossed = {}, {}
  for _, b in ipairs(acct.buckets) do
    local key = scopes[b[1]]
    local avail, cap = bucket_now(key, b, now, window)
    local cost = account_cost(spec.costs, b[6], scopes[2])
    bucket_set(key, b, now, window, avail - cost, cap)
    charges[#charges + 1] = {b[1], b[2], b[3], b[4], b[5], b[6], cost, window}
    local used_before, used_after = cap - avail, cap - avail + cost
    if b[3] == 1 and used_before < ALERT_AT * cap and used_after >= ALERT_AT * cap then
      crossed[#crossed + 1] = b[2] .. ':' .. used_after .. ':' .. cap
    end
  end
  for s = 1, 2 do keep_hash(scopes[s], KEEP_MS, now) end
  return charges, crossed
end

-- Give back what `charges` took (a reservation that is not used as made).
local function refund(i, charges)
  local scopes = keys_of(i)
  for _, c in ipairs(charges) do
    if c[3] == 0 or c[8] == window then
      local key = scopes[c[1]]
      local avail, cap = bucket_now(key, c, now, window)
      avail = avail + c[7]
      if avail > cap then avail = cap end
      bucket_set(key, c, now, window, avail, cap)
    end
  end
end

-- The lease: a member of the account's leases set until settle removes it (once: settle acts
-- only if its ZREM did) or its time passes. What it charged travels with the job, not in Redis.
local function take_lease(i, charges, probe)
  local scopes, leases = keys_of(i)
  if hnum(scopes[1], 'leases_pruned', 0) + DAY_MS < now then  -- leases of workers that died
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
    hset(scopes[1], 'leases_pruned', num(now))
  end
  redis.call('ZADD', leases, now + spec.lease_ttl_ms, spec.lease_id)
  -- the set outlives its newest lease; its TTL is pushed out once per lease time, not per lease
  if hnum(scopes[1], 'leases_keep', 0) < now + spec.lease_ttl_ms then
    redis.call('PEXPIRE', leases, 2 * spec.lease_ttl_ms)
    hset(scopes[1], 'leases_keep', num(now + 2 * spec.lease_ttl_ms))
  end
  if probe then hset(scopes[1], 'probe_until', num(now + spec.probe_ttl_ms)) end
  -- the model's learned input ratio goes with the lease too: settle learns from it unread
  return cjson.encode(charges), probe and 1 or 0, tostring(hnum(scopes[2], 'in_ratio', 1))
end

-- 1. A reservation made for this job: a little early, it waits; in time, it becomes the lease;
--    too late, or its account now blocked, it is given back and the job admitted afresh.
if spec.reservation then
  local raw = redis.call('GET', RESERVATION)
  if raw then
    local r = cjson.decode(raw)
    local acct = spec.accounts[r.account]
    if spec.release then  -- its job will not come for it (cancelled, or already final)
      redis.call('DEL', RESERVATION)
      if acct ~= nil and acct.key_id == r.key_id then refund(r.account, r.charges) end
      return done({3, 1, 'released', now})
    end
    if acct ~= nil and acct.key_id == r.key_id then
      if now < r.ready_at then return done({0, r.ready_at - now, 'reserved', now}) end
      redis.call('DEL', RESERVATION)
      if now <= r.ready_at + spec.stale_ms then
        local wait, _, probe = gate(r.account, acct, true)
        if wait <= 0 then
          local charges, probed, ratio = take_lease(r.account, r.charges, probe)
          return done({1, r.account, now, {}, charges, probed, ratio})
        end
      end
      refund(r.account, r.charges)
    else
      redis.call('DEL', RESERVATION)  -- the keys changed since: nothing here to give back
    end
  end
  if spec.release then return done({3, 0, 'released', now}) end
end

-- 2. Admission now (or, reserving, the account whose budget is back soonest).
local best, best_room, best_probe = nil, nil, false
local soonest, soonest_why = nil, 'never:no usable key'
local reservable, reservable_wait = nil, nil

for i, acct in ipairs(spec.accounts) do
  local wait, why, probe = gate(i, acct, not reserving)
  local b_wait, b_why, room, daily = budget(i, acct)
  if reserving and wait <= 0 and not daily and b_wait < NEVER then
    if reservable == nil or b_wait < reservable_wait then reservable, reservable_wait = i, b_wait end
  end
  if b_wait > wait then wait, why = b_wait, b_why end
  if wait <= 0 then
    if best == nil or room > best_room then best, best_room, best_probe = i, room, probe end
  elseif soonest == nil or wait < soonest then
    soonest, soonest_why = wait, why
  end
end

if reserving then
  if reservable ~= nil and reservable_wait <= spec.reserve_ms then
    local acct = spec.accounts[reservable]
    local ready_at = now + math.ceil(reservable_wait)
    local charges = debit(reservable, acct)
    local record = {account = reservable, key_id = acct.key_id, ready_at = ready_at, charges = charges}
    redis.call('SET', RESERVATION, cjson.encode(record), 'PX',
      math.ceil(ready_at - now + spec.stale_ms + spec.lease_ttl_ms))
    return done({2, reservable, ready_at, now})
  end
  return done({0, math.ceil(soonest or NEVER), soonest_why, now})
end

if best == nil then
  return done({0, math.ceil(soonest or NEVER), soonest_why, now})
end

local charges, crossed = debit(best, spec.accounts[best])
local charged, probed, ratio = take_lease(best, charges, best_probe)
return done({1, best, now, crossed, charged, probed, ratio})
