-- inspect: read one provider's state without changing it, for placement and `spillway status`.
--
-- KEYS[1] pending hash
-- KEYS[2+3(i-1) .. 4+3(i-1)]  for account i: "*" hash, model hash, leases zset
-- ARGV[1] JSON {offset_ms, stopped_ms (tests only), day_shift_ms,
--               accounts = [{key_id, concurrency, buckets}]}
-- Returns a JSON string {now, next_reset, pending = {field: amount},
--   accounts = [{disabled, blocked_until, blocked_why, open_until, probe_until, fails,
--                in_flight, in_ratio, buckets = [{field, scope, kind, avail, cap, period}]}]}
--   (limiter/state.py parses it: Snapshot.parse)

local spec = cjson.decode(ARGV[1])
local now = now_ms(spec)
local window = math.floor((now + spec.day_shift_ms) / DAY_MS)
local out = {now = now, next_reset = (window + 1) * DAY_MS - spec.day_shift_ms, pending = {}, accounts = {}}

local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do out.pending[flat[i]] = tonumber(flat[i + 1]) end

for i, acct in ipairs(spec.accounts) do
  local base = 1 + (i - 1) * 3
  local scopes = {KEYS[base + 1], KEYS[base + 2]}
  local info = {buckets = {}, blocked_until = 0, blocked_why = ''}
  info.disabled = hget(scopes[1], 'off:' .. acct.key_id) or ''
  for s = 1, 2 do
    local until_ms = hnum(scopes[s], 'blocked_until', 0)
    if until_ms > info.blocked_until then
      info.blocked_until = until_ms
      info.blocked_why = hget(scopes[s], 'blocked_why') or ''
    end
  end
  info.open_until = hnum(scopes[1], 'open_until', 0)
  info.probe_until = hnum(scopes[1], 'probe_until', 0)
  info.fails = hnum(scopes[1], 'fails', 0)
  info.in_flight = redis.call('ZCOUNT', KEYS[base + 3], '(' .. num(now), '+inf')
  info.in_ratio = hnum(scopes[2], 'in_ratio', 1)
  for _, b in ipairs(acct.buckets) do
    local avail, cap = bucket_now(scopes[b[1]], b, now, window)
    info.buckets[#info.buckets + 1] = {field = b[2], scope = b[1], kind = b[3], avail = avail,
                                       cap = cap, period = b[5]}
  end
  out.accounts[#out.accounts + 1] = info
end
return cjson.encode(out)
