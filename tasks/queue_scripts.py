"""Lua scripts of the queue recovery: every move of a pending entry is ONE atomic server-side step.

Each script re-checks, inside Redis, the condition the Python decision relied on (entry still pending, still
idle enough or still owned by the same dead consumer), so a concurrent sweep, a late ACK or a worker that
claimed the entry meanwhile makes the step a harmless no-op instead of a duplicate.
"""

from __future__ import annotations

# Shared Lua helpers: stream id order, and batched reads that fall back to per-id lookups.
# A range read (XRANGE / XPENDING lo hi COUNT k) costs ~1 us per entry; a per-id lookup ~7 us (it seeks
# inside a listpack node), so both read the ids' whole range at most 2x+16 entries wide, then look up per id
# only what lies beyond what that read covered (a sparse range).
_HELPERS = r"""
local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function id_lte(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as <= bs)
end
-- lowest and highest of a list of ids (callers pass them ascending, but order is not trusted)
local function id_bounds(ids)
  local lo, hi = ids[1], ids[1]
  for i = 2, #ids do
    if id_lte(hi, ids[i]) then hi = ids[i] elseif id_lte(ids[i], lo) then lo = ids[i] end
  end
  return lo, hi
end
-- id -> flat field array, for the ids that exist in the stream
local function read_entries(stream, ids)
  local found = {}
  if #ids == 0 then return found end
  local limit = 2 * #ids + 16
  local lo, hi = id_bounds(ids)
  local got = redis.call('XRANGE', stream, lo, hi, 'COUNT', limit)
  for _, e in ipairs(got) do found[e[1]] = e[2] end
  if #got >= limit then
    local covered = got[#got][1]
    for _, id in ipairs(ids) do
      if not found[id] and not id_lte(id, covered) then
        local r = redis.call('XRANGE', stream, id, id)
        if #r > 0 then found[id] = r[1][2] end
      end
    end
  end
  return found
end
-- id -> {id, consumer, idle_ms, deliveries}, for the ids that are pending in the group
local function read_pending(stream, group, ids)
  local found = {}
  if #ids == 0 then return found end
  local limit = 2 * #ids + 16
  local lo, hi = id_bounds(ids)
  local got = redis.call('XPENDING', stream, group, lo, hi, limit)
  for _, e in ipairs(got) do found[e[1]] = e end
  if #got >= limit then
    local covered = got[#got][1]
    for _, id in ipairs(ids) do
      if not found[id] and not id_lte(id, covered) then
        local r = redis.call('XPENDING', stream, group, id, id, 1)
        if #r > 0 then found[id] = r[1] end
      end
    end
  end
  return found
end
"""

# Read-only page of the pending list, enriched from the entries themselves.
# KEYS: stream. ARGV: group, start (inclusive id, "(id" exclusive or "-"), count, consumer ("" = all).
# Returns JSON: a flat array, 9 items per pending entry:
#   id, consumer, idle_ms, deliveries, exists (1/0), attempts (text, "0" if absent), job_id, step_id, run_id.
# Cost: one XPENDING of `count` entries and one range XRANGE over their ids: O(count + log N).
SCAN_PENDING = (
    _HELPERS
    + r"""
local p
if ARGV[4] ~= '' then
  p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], '+', tonumber(ARGV[3]), ARGV[4])
else
  p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], '+', tonumber(ARGV[3]))
end
local ids = {}
for i, e in ipairs(p) do ids[i] = e[1] end
local entries = read_entries(KEYS[1], ids)
local out = {}
local n = 0
for _, e in ipairs(p) do
  local f = entries[e[1]]
  local exists, attempts, job, step, run = 0, '0', '', '', ''
  if f then
    exists = 1
    for j = 1, #f, 2 do
      local k = f[j]
      if k == 'attempts' then attempts = f[j + 1]
      elseif k == 'job_id' then job = f[j + 1]
      elseif k == 'step_id' then step = f[j + 1]
      elseif k == 'run_id' then run = f[j + 1] end
    end
  end
  out[n + 1] = e[1]; out[n + 2] = e[2]; out[n + 3] = e[3]; out[n + 4] = e[4]
  out[n + 5] = exists; out[n + 6] = attempts; out[n + 7] = job; out[n + 8] = step; out[n + 9] = run
  n = n + 9
end
return cjson.encode(out)
"""
)

# Act on a batch of decided pending entries (in any order; ascending is fastest).
# KEYS: stream, dlq. ARGV[1]: JSON [group, min_idle_ms, claim_consumer, id, action, owner, reason, ...] with
# 4 items per entry: action R = requeue, D = dead-letter, O = orphan ack, C = claim; owner "" = re-check
# idle >= min_idle_ms, a name = re-check the entry is still owned by that (dead) consumer.
# Returns JSON: a flat array, 2 items per entry: status, new id ("" when none). Statuses:
#   requeued, dead_lettered, orphan_acked, claimed, skipped_gone (no longer pending: acked or taken),
#   skipped_busy (no longer idle enough), skipped_moved (now owned by another consumer).
# Requeue: XADD a copy of the fields with attempts = attempts + deliveries, then XACK the original.
# Dead-letter: XADD to the DLQ the runbook's fields (job_id, error) plus the original id, fields (JSON),
# total deliveries, last consumer, reason and time, then XACK. Orphan (entry deleted/trimmed): XACK only.
# Cost: O(batch + log N): one range XPENDING, one range XRANGE, one XADD per moved entry, chunked XACKs.
ACT_PENDING = (
    _HELPERS
    + r"""
local stream, dlq = KEYS[1], KEYS[2]
local a = cjson.decode(ARGV[1])
local group, min_idle, claimer = a[1], tonumber(a[2]), a[3]
local t = redis.call('TIME')
local now_ms = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local ids = {}
for i = 4, #a, 4 do ids[#ids + 1] = a[i] end
local pending = read_pending(stream, group, ids)
local take = {}
for i = 4, #a, 4 do
  local p = pending[a[i]]
  if p and (a[i + 2] == '' and p[3] >= min_idle or a[i + 2] ~= '' and p[2] == a[i + 2]) then
    take[#take + 1] = a[i]
  end
end
local entries = read_entries(stream, take)
local out = {}
local acks = {}
for i = 4, #a, 4 do
  local id, action, owner, reason = a[i], a[i + 1], a[i + 2], a[i + 3]
  local status, new_id = '', ''
  local p = pending[id]
  if not p then
    status = 'skipped_gone'
  elseif owner ~= '' and p[2] ~= owner then
    status = 'skipped_moved'
  elseif owner == '' and p[3] < min_idle then
    status = 'skipped_busy'
  else
    local last_consumer, deliveries = p[2], p[4]
    local f = entries[id]
    if not f then
      acks[#acks + 1] = id
      status = 'orphan_acked'
    elseif action == 'O' then
      status = 'skipped_moved'
    elseif action == 'C' then
      -- JUSTID alone would not count a delivery; the claim is one, so count it like XAUTOCLAIM does.
      redis.call('XCLAIM', stream, group, claimer, 0, id, 'RETRYCOUNT', deliveries + 1, 'JUSTID')
      status = 'claimed'
    else
      local attempts = 0
      for j = 1, #f, 2 do
        if f[j] == 'attempts' then attempts = tonumber(f[j + 1]) or 0 end
      end
      local total = attempts + deliveries
      if action == 'R' then
        local copy = {}
        for j = 1, #f, 2 do
          if f[j] ~= 'attempts' then
            copy[#copy + 1] = f[j]; copy[#copy + 1] = f[j + 1]
          end
        end
        copy[#copy + 1] = 'attempts'; copy[#copy + 1] = tostring(total)
        new_id = redis.call('XADD', stream, '*', unpack(copy))
        acks[#acks + 1] = id
        status = 'requeued'
      elseif action == 'D' then
        local fields = {}
        local job, run, step = '', '', ''
        for j = 1, #f, 2 do
          fields[f[j]] = f[j + 1]
          if f[j] == 'job_id' then job = f[j + 1]
          elseif f[j] == 'run_id' then run = f[j + 1]
          elseif f[j] == 'step_id' then step = f[j + 1] end
        end
        if job == '' then job = step end
        new_id = redis.call('XADD', dlq, '*',
          'job_id', job, 'error', 'Max retries exceeded', 'run_id', run, 'step_id', step,
          'reason', reason, 'original_id', id, 'original_stream', stream,
          'deliveries', tostring(total), 'last_consumer', last_consumer,
          'dead_lettered_at_ms', now_ms, 'fields', cjson.encode(fields))
        acks[#acks + 1] = id
        status = 'dead_lettered'
      else
        return redis.error_reply('unknown action ' .. tostring(action))
      end
    end
  end
  out[#out + 1] = status; out[#out + 1] = new_id
end
for i = 1, #acks, 500 do
  redis.call('XACK', stream, group, unpack(acks, i, math.min(i + 499, #acks)))
end
return cjson.encode(out)
"""
)

# Move dead-lettered entries back to the stream with the attempt count reset, and delete them from the DLQ.
# KEYS: dlq, stream. ARGV: DLQ entry ids. Returns 3 items per id: id, status (replayed | skipped_gone), new id.
# The original fields come from the DLQ entry's `fields` JSON; an entry written by hand (only job_id/error)
# is replayed as job_id/run_id/step_id.
REPLAY_DLQ = r"""
local dlq, stream = KEYS[1], KEYS[2]
local out = {}
local n = 0
for _, id in ipairs(ARGV) do
  local status, new_id = 'skipped_gone', ''
  local r = redis.call('XRANGE', dlq, id, id)
  if #r > 0 then
    local f = r[1][2]
    local d = {}
    for j = 1, #f, 2 do d[f[j]] = f[j + 1] end
    local orig = {}
    if d['fields'] then
      local ok, decoded = pcall(cjson.decode, d['fields'])
      if ok and type(decoded) == 'table' then orig = decoded end
    end
    for _, k in ipairs({'job_id', 'run_id', 'step_id'}) do
      if (orig[k] == nil or orig[k] == '') and d[k] and d[k] ~= '' then orig[k] = d[k] end
    end
    local copy = {}
    for _, k in ipairs({'job_id', 'run_id', 'step_id', 'payload'}) do
      if orig[k] ~= nil then copy[#copy + 1] = k; copy[#copy + 1] = tostring(orig[k]) end
    end
    local rest = {}
    for k, _ in pairs(orig) do
      if k ~= 'job_id' and k ~= 'run_id' and k ~= 'step_id' and k ~= 'payload' and k ~= 'attempts' then
        rest[#rest + 1] = k
      end
    end
    table.sort(rest)
    for _, k in ipairs(rest) do copy[#copy + 1] = k; copy[#copy + 1] = tostring(orig[k]) end
    copy[#copy + 1] = 'attempts'; copy[#copy + 1] = '0'
    new_id = redis.call('XADD', stream, '*', unpack(copy))
    redis.call('XDEL', dlq, id)
    status = 'replayed'
  end
  out[n + 1] = id; out[n + 2] = status; out[n + 3] = new_id
  n = n + 3
end
return out
"""

# Delete consumers that own nothing. KEYS: stream. ARGV: group, min_idle_ms, names...
# Per name: deleted | kept_pending (still owns entries: never deleted) | kept_busy (idle below the
# threshold) | skipped_gone (no such consumer). XGROUP DELCONSUMER would drop the consumer's pending
# entries, so the zero-pending check and the delete happen in the same atomic step.
DELETE_EMPTY_CONSUMERS = r"""
local stream, group, min_idle = KEYS[1], ARGV[1], tonumber(ARGV[2])
local idle = {}
local info = redis.call('XINFO', 'CONSUMERS', stream, group)
for _, c in ipairs(info) do
  local name, ms
  for j = 1, #c, 2 do
    if c[j] == 'name' then name = c[j + 1] elseif c[j] == 'idle' then ms = c[j + 1] end
  end
  idle[name] = ms
end
local out = {}
for i = 3, #ARGV do
  local name = ARGV[i]
  local status
  if idle[name] == nil then
    status = 'skipped_gone'
  elseif #redis.call('XPENDING', stream, group, '-', '+', 1, name) > 0 then
    status = 'kept_pending'
  elseif idle[name] < min_idle then
    status = 'kept_busy'
  else
    redis.call('XGROUP', 'DELCONSUMER', stream, group, name)
    status = 'deleted'
  end
  out[#out + 1] = name; out[#out + 1] = status
end
return out
"""
