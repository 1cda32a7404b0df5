"""Lua scripts of the queue recovery: every move of a pending entry is ONE atomic server-side step.

Each script re-checks, inside Redis, the condition the Python decision relied on (entry still pending, still
idle enough or still owned by the same dead consumer), so a concurrent sweep, a late ACK or a worker that
claimed the entry meanwhile makes the step a harmless no-op instead of a duplicate.

Indexes (the recovery's own keys under ``FD_STATE_PREFIX``, see ``tasks.queue.IndexKeys``) let a step be found
without reading the DLQ or the undelivered tail:
- the DLQ index, a hash step id -> DLQ entry ids (space-separated), is written in the SAME script as the DLQ
  entry (ACT_PENDING) and removed in the same script that deletes it (REPLAY_DLQ, TRIM_DLQ); entries written by
  anyone else (the runbook's manual XADD) are indexed by INDEX_LOOKUP, which reads only what lies after its
  cursor (every DLQ entry up to the cursor is indexed);
- the stream index holds every entry from the oldest pending one on, in buckets of ``bucket_ms`` of entry time
  (one hash per bucket: step id -> entry ids), filled by INDEX_LOOKUP from its cursor (each entry read once);
  a bucket is dropped whole once every entry in it was delivered and none is pending. So a step is found
  pending or queued without reading the pending list or the backlog. A hit is always re-read (XRANGE id id,
  XPENDING id id) before it counts, so an entry deleted or acknowledged meanwhile is never reported.
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
local function id_lt(a, b)
  return not id_lte(b, a)
end
-- the id just before `id` (for an exclusive range that starts at `id`)
local function id_prev(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if tonumber(seq) > 0 then return ms .. '-' .. (tonumber(seq) - 1) end
  return string.format('%d-18446744073709551615', tonumber(ms) - 1)
end
-- flat [k1, v1, k2, v2 ...] -> {k1 = v1, ...}
local function kv(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
-- XINFO STREAM as a table, or nil when the key does not exist
local function stream_info(key)
  if redis.call('EXISTS', key) == 0 then return nil end
  return kv(redis.call('XINFO', 'STREAM', key))
end
-- XINFO GROUPS' entry of `group` as a table, or nil
local function group_of(stream, group)
  for _, x in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local t = kv(x)
    if t['name'] == group then return t end
  end
  return nil
end
-- the job_id and step_id of an entry's flat fields ('' when absent)
local function job_step(f)
  local job, step = '', ''
  for j = 1, #f, 2 do
    local k = f[j]
    if k == 'job_id' then job = f[j + 1] elseif k == 'step_id' then step = f[j + 1] end
  end
  return job, step
end
-- an index is a hash: step id -> space-separated entry ids (a step may have several copies)
local function list_add(key, field, id)
  if not field or field == '' then return end
  if redis.call('HSETNX', key, field, id) == 1 then return end
  local cur = redis.call('HGET', key, field)
  for x in string.gmatch(cur, '%S+') do if x == id then return end end
  redis.call('HSET', key, field, cur .. ' ' .. id)
end
local function list_del(key, field, id)
  if not field or field == '' then return end
  local cur = redis.call('HGET', key, field)
  if not cur then return end
  local keep = {}
  for x in string.gmatch(cur, '%S+') do if x ~= id then keep[#keep + 1] = x end end
  if #keep == 0 then redis.call('HDEL', key, field) else redis.call('HSET', key, field, table.concat(keep, ' ')) end
end
local function index_entry(idx, id, f)
  local job, step = job_step(f)
  list_add(idx, job, id)
  if step ~= job then list_add(idx, step, id) end
end
local function unindex_entry(idx, id, f)
  local job, step = job_step(f)
  list_del(idx, job, id)
  if step ~= job then list_del(idx, step, id) end
end
-- the DLQ index is "in sync" when its cursor is the DLQ's last generated id: nothing unindexed lies after it
local function dlq_in_sync(dlq, cursor_key)
  local info = stream_info(dlq)
  local last = info and info['last-generated-id'] or '0-0'
  return (redis.call('GET', cursor_key) or '0-0') == last
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
# KEYS: stream. ARGV: group, start (inclusive id, "(id" exclusive or "-"), count, consumer ("" = all),
# min_idle_ms ("" = any): only entries idle at least this long (XPENDING IDLE: filtered inside Redis, so a
# pending list held by busy live workers costs one call and transfers nothing).
# Returns JSON: a flat array, 9 items per pending entry:
#   id, consumer, idle_ms, deliveries, exists (1/0), attempts (text, "0" if absent), job_id, step_id, run_id.
# Cost: one XPENDING of `count` entries and one range XRANGE over their ids: O(count + log N).
SCAN_PENDING = (
    _HELPERS
    + r"""
local cmd = {'XPENDING', KEYS[1], ARGV[1]}
if ARGV[5] and ARGV[5] ~= '' then cmd[#cmd + 1] = 'IDLE'; cmd[#cmd + 1] = ARGV[5] end
cmd[#cmd + 1] = ARGV[2]; cmd[#cmd + 1] = '+'; cmd[#cmd + 1] = tonumber(ARGV[3])
if ARGV[4] ~= '' then cmd[#cmd + 1] = ARGV[4] end
local p = redis.call(unpack(cmd))
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
# KEYS: stream, dlq, dlq index, dlq index cursor. ARGV[1]: JSON [group, min_idle_ms, claim_consumer, id, action, owner, reason, ...] with
# 4 items per entry: action R = requeue, D = dead-letter, O = orphan ack, C = claim; owner "" = re-check
# idle >= min_idle_ms, a name = re-check the entry is still owned by that (dead) consumer.
# Returns JSON: a flat array, 2 items per entry: status, new id ("" when none). Statuses:
#   requeued, dead_lettered, orphan_acked, claimed, skipped_gone (no longer pending: acked or taken),
#   skipped_busy (no longer idle enough), skipped_moved (now owned by another consumer).
# Requeue: XADD a copy of the fields with attempts = attempts + deliveries, then XACK the original.
# Dead-letter: XADD to the DLQ the runbook's fields (job_id, error) plus the original id, fields (JSON),
# total deliveries, last consumer, reason and time, then XACK; the DLQ entry is indexed (job/step id -> its id)
# in the same step, and the index cursor follows it when nothing unindexed lay before it.
# Orphan (entry deleted/trimmed): XACK only.
# Cost: O(batch + log N): one range XPENDING, one range XRANGE, one XADD per moved entry, chunked XACKs.
ACT_PENDING = (
    _HELPERS
    + r"""
local stream, dlq, dlq_index, dlq_cursor = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local sync = nil
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
        if sync == nil then sync = dlq_in_sync(dlq, dlq_cursor) end
        new_id = redis.call('XADD', dlq, '*',
          'job_id', job, 'error', 'Max retries exceeded', 'run_id', run, 'step_id', step,
          'reason', reason, 'original_id', id, 'original_stream', stream,
          'deliveries', tostring(total), 'last_consumer', last_consumer,
          'dead_lettered_at_ms', now_ms, 'fields', cjson.encode(fields))
        index_entry(dlq_index, new_id, {'job_id', job, 'step_id', step})
        if sync then redis.call('SET', dlq_cursor, new_id) end
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
# KEYS: dlq, stream, dlq index. ARGV: DLQ entry ids. Returns 3 items per id: id, status (replayed |
# skipped_gone), new id. The entry leaves the DLQ index in the same step it leaves the DLQ.
# The original fields come from the DLQ entry's `fields` JSON; an entry written by hand (only job_id/error)
# is replayed as job_id/run_id/step_id.
REPLAY_DLQ = (
    _HELPERS
    + r"""
local dlq, stream, dlq_index = KEYS[1], KEYS[2], KEYS[3]
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
    unindex_entry(dlq_index, id, f)
    redis.call('XDEL', dlq, id)
    status = 'replayed'
  end
  out[n + 1] = id; out[n + 2] = status; out[n + 3] = new_id
  n = n + 3
end
return out
"""
)

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

# Bring the stream and DLQ indexes up to date (at most `budget` new entries of each per call), drop the stream
# buckets nothing is waiting in any more, then (once both are up to date) look the wanted step ids up.
# KEYS: stream, dlq, dlq index, dlq cursor, stream index meta (hash: floor, cursor, added), buckets (zset).
# ARGV[1]: JSON {group, wanted = [...], budget, bucket_prefix, bucket_ms, dlq_only (skip the stream lookup)}.
# Returns JSON {more = bool (call again: not up to date yet), tail = n indexed, dlq = n indexed, pruned = n
# buckets, found = {step -> {pending = [id, consumer, idle_ms, deliveries, attempts]} or {queued = id} or
# {dlq = [[id, deliveries], ...]}}}.
# The stream index covers every entry after its floor: step id -> entry ids, in buckets of `bucket_ms` of entry
# time. It is (re)built from the oldest pending entry (else the first undelivered one) and then takes in every
# new entry once; the oldest buckets are dropped once wholly delivered with none of their entries pending (the
# floor rises past them). So every pending or undelivered entry is in it: a step is found pending or queued
# without the pending list or the backlog being read. A group moved back before the floor, a pending entry at
# or before it, or a re-created stream rebuild it. Cost per call: O(budget) when behind; up to date: O(1), plus
# O(wanted x live buckets) lookups, each hit re-read by id (XRANGE id id, XPENDING id id).
INDEX_LOOKUP = (
    _HELPERS
    + r"""
local stream, dlq, didx, dcur, tmeta, tbuckets = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local a = cjson.decode(ARGV[1])
local budget, bprefix, bms = tonumber(a.budget), a.bucket_prefix, tonumber(a.bucket_ms)
local function bucket_of(id)
  local ms = id_parts(id)
  return math.floor(ms / bms)
end
local out = {more = false, tail = 0, dlq = 0, pruned = 0}

-- the stream
local sinfo = stream_info(stream)
local ldi, g = '0-0', nil
if sinfo then
  g = group_of(stream, a.group)
  if g then ldi = g['last-delivered-id'] end
  local m = kv(redis.call('HGETALL', tmeta))
  local floor, cursor, added = m['floor'], m['cursor'], tonumber(m['added'] or '0')
  local oldest = nil
  if g and g['pending'] > 0 then oldest = redis.call('XPENDING', stream, a.group, '-', '+', 1)[1][1] end
  if not cursor or id_lt(ldi, floor) or sinfo['entries-added'] < added or (oldest and id_lte(oldest, floor)) then
    for _, b in ipairs(redis.call('ZRANGE', tbuckets, 0, -1)) do redis.call('UNLINK', bprefix .. b) end
    redis.call('DEL', tbuckets)
    cursor = ldi
    if oldest and id_lte(oldest, ldi) then cursor = id_prev(oldest) end
    floor = cursor
  end
  local got = redis.call('XRANGE', stream, '(' .. cursor, '+', 'COUNT', budget)
  local seen = {}
  for _, e in ipairs(got) do
    local b = bucket_of(e[1])
    local job, step = job_step(e[2])
    list_add(bprefix .. b, job, e[1])
    if step ~= job then list_add(bprefix .. b, step, e[1]) end
    if not seen[b] then
      seen[b] = true
      redis.call('ZADD', tbuckets, b, b)
    end
  end
  out.tail = #got
  if #got >= budget then
    out.more = true
    cursor = got[#got][1]
  elseif id_lt(cursor, sinfo['last-generated-id']) then
    cursor = sinfo['last-generated-id']
  end
  -- the oldest buckets, while wholly delivered and holding no pending entry: dropped, the floor past them
  if g then
    local delivered_ms = id_parts(ldi)
    for _, b in ipairs(redis.call('ZRANGE', tbuckets, 0, 19)) do
      local lo, hi = tonumber(b) * bms, (tonumber(b) + 1) * bms - 1
      if hi >= delivered_ms then break end
      if g['pending'] > 0 and #redis.call('XPENDING', stream, a.group, lo, hi, 1) > 0 then break end
      redis.call('UNLINK', bprefix .. b)
      redis.call('ZREM', tbuckets, b)
      floor = string.format('%d-18446744073709551615', hi)
      out.pruned = out.pruned + 1
    end
  end
  if floor ~= m['floor'] or cursor ~= m['cursor'] or tostring(sinfo['entries-added']) ~= m['added'] then
    redis.call('HSET', tmeta, 'floor', floor, 'cursor', cursor, 'added', sinfo['entries-added'])
  end
end

-- the DLQ
local dinfo = stream_info(dlq)
if dinfo then
  local cursor = redis.call('GET', dcur) or '0-0'
  local got = redis.call('XRANGE', dlq, '(' .. cursor, '+', 'COUNT', budget)
  for _, e in ipairs(got) do index_entry(didx, e[1], e[2]) end
  out.dlq = #got
  local new = cursor
  if #got >= budget then
    out.more = true
    new = got[#got][1]
  elseif id_lt(cursor, dinfo['last-generated-id']) then
    new = dinfo['last-generated-id']
  end
  if new ~= cursor then redis.call('SET', dcur, new) end
end

if out.more or #a.wanted == 0 then return cjson.encode(out) end

-- look up: pending (the first copy still in the pending list), else queued (the first copy after the
-- last-delivered id), else every DLQ copy; each hit re-read (it must exist and still be the step's)
local found = {}
local live = {}
if sinfo and not a.dlq_only then live = redis.call('ZRANGE', tbuckets, 0, -1) end
local function holds(f, key)
  local job, step = job_step(f)
  return job == key or step == key
end
for _, key in ipairs(a.wanted) do
  local pending, queued = nil, nil
  for _, b in ipairs(live) do
    local ids = redis.call('HGET', bprefix .. b, key)
    if ids then
      for id in string.gmatch(ids, '%S+') do
        if pending then break end
        local r = redis.call('XRANGE', stream, id, id)
        if #r > 0 and holds(r[1][2], key) then
          local p = {}
          if g and g['pending'] > 0 then p = redis.call('XPENDING', stream, a.group, id, id, 1) end
          if #p > 0 then
            local attempts = '0'
            for j = 1, #r[1][2], 2 do if r[1][2][j] == 'attempts' then attempts = r[1][2][j + 1] end end
            pending = {id, p[1][2], p[1][3], p[1][4], attempts}
          elseif id_lt(ldi, id) and not queued then
            queued = id
          end
        end
      end
    end
    if pending then break end
  end
  if pending then
    found[key] = {pending = pending}
  elseif queued then
    found[key] = {queued = queued}
  else
    local ids = redis.call('HGET', didx, key)
    if ids then
      local copies = {}
      for id in string.gmatch(ids, '%S+') do
        local r = dinfo and redis.call('XRANGE', dlq, id, id) or {}
        if #r > 0 and holds(r[1][2], key) then
          local deliveries = ''
          for j = 1, #r[1][2], 2 do if r[1][2][j] == 'deliveries' then deliveries = r[1][2][j + 1] end end
          copies[#copies + 1] = {id, deliveries}
        else
          list_del(didx, key, id)  -- deleted by hand (XDEL): the index forgets it
        end
      end
      if #copies > 0 then found[key] = {dlq = copies} end
    end
  end
end
out.found = found
return cjson.encode(out)
"""
)

# DLQ retention: trim the oldest entries that are over a limit, and their index entries, in one step.
# KEYS: dlq, dlq index. ARGV: max_age_ms (0 = no age limit), max_length (0 = no length limit), count, dry (1/0).
# An entry is over the limit when its id's time (the moment it was dead-lettered) is older than now - max_age,
# or it is among the oldest (XLEN - max_length). Those form a prefix of the stream: the step reads at most
# `count` oldest entries, stops at the first one within every limit, and (unless dry) removes the prefix with
# XTRIM MINID (exact) and their job/step ids from the index. Returns JSON {trimmed, by_age, by_length, first,
# last, first_ms, last_ms, jobs (a sample of 10 [step id, entry id]), more (a full page was over the limit:
# call again)}.
TRIM_DLQ = (
    _HELPERS
    + r"""
local dlq, didx = KEYS[1], KEYS[2]
local max_age, max_len, count, dry = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {trimmed = 0, by_age = 0, by_length = 0, jobs = {}, more = false}
if redis.call('EXISTS', dlq) == 0 then return cjson.encode(out) end
local over_len = 0
if max_len > 0 then over_len = math.max(0, redis.call('XLEN', dlq) - max_len) end
local page = redis.call('XRANGE', dlq, '-', '+', 'COUNT', count)
local last = nil
for i, e in ipairs(page) do
  local ms = id_parts(e[1])
  local old = max_age > 0 and ms < now - max_age
  if not old and i > over_len then break end
  if old then out.by_age = out.by_age + 1 else out.by_length = out.by_length + 1 end
  if not dry then unindex_entry(didx, e[1], e[2]) end
  if out.trimmed == 0 then out.first = e[1]; out.first_ms = ms end
  out.trimmed = out.trimmed + 1
  last = e[1]
  out.last_ms = ms
  if #out.jobs < 10 then
    local job, step = job_step(e[2])
    out.jobs[#out.jobs + 1] = {job ~= '' and job or step, e[1]}
  end
end
if last then
  out.last = last
  out.more = out.trimmed == #page and #page == count
  if not dry then
    local ms, seq = id_parts(last)
    redis.call('XTRIM', dlq, 'MINID', string.format('%d-%d', ms, seq + 1))
  end
end
return cjson.encode(out)
"""
)

# The group's lag when Redis reports it unknown (an entry deleted after the last-delivered id, or a group set to
# an arbitrary id), counted inside Redis: only a number travels. A finished count is kept (the ledger hash) with
# the stream's state; a later call adds the entries added since and subtracts those delivered since, counting
# only the range delivered meanwhile, as long as nothing was removed from the stream since (or nothing after
# the ledger's last-delivered id: max-deleted-entry-id and the first entry both at or before it). Otherwise it
# counts again. At most `budget` entries are read per call (a partial count is kept and continued).
# count_lag(stream, ledger, s = XINFO STREAM table, ldi, budget) -> the lag, or nil (call again).
_LAG = r"""
local function count_lag(stream, ledger, s, ldi, budget)
  local lg, len, added = s['last-generated-id'], s['length'], s['entries-added']
  local removed = added - len
  local md, first = s['max-deleted-entry-id'], s['recorded-first-entry-id']
  if len == 0 or not id_lt(ldi, lg) then return 0 end
  if id_lt(ldi, first) then return len end
  -- entries in (lo, hi], counting at most `limit`: n, done, the last id read
  local function count_range(lo, hi, limit)
    local n, from = 0, '(' .. lo
    while n < limit do
      local want = math.min(1000, limit - n)
      local got = redis.call('XRANGE', stream, from, hi, 'COUNT', want)
      n = n + #got
      if #got < want then return n, true, nil end
      from = '(' .. got[#got][1]
    end
    return n, false, string.sub(from, 2)
  end
  -- nothing removed since the ledger's state, or nothing after its last-delivered id
  local function untouched(L)
    return tonumber(L['removed']) == removed or (id_lte(md, L['ldi']) and id_lte(first, L['ldi']))
  end
  local L = kv(redis.call('HGETALL', ledger))
  if L['state'] == 'counting' and not untouched(L) then L = {} end
  if L['state'] ~= 'ready' then
    if L['state'] ~= 'counting' then
      L = {state = 'counting', ldi = ldi, lg = lg, added = added, removed = removed, count = 0, at = ldi}
    end
    local n, done, at = count_range(L['at'], L['lg'], budget)
    L['count'] = tonumber(L['count']) + n
    if not done then
      L['at'] = at
      redis.call('HSET', ledger, 'state', 'counting', 'ldi', L['ldi'], 'lg', L['lg'], 'added', L['added'],
        'removed', L['removed'], 'count', L['count'], 'at', L['at'])
      return nil
    end
    L['state'] = 'ready'
  end
  if untouched(L) and id_lte(L['ldi'], ldi) then
    -- entries now after `anchor` = the ledger's + those added since - those delivered since (counted)
    local delivered, done, at = count_range(L['ldi'], ldi, budget)
    local anchor = done and ldi or at
    local lag = tonumber(L['count']) + (added - tonumber(L['added'])) - delivered
    redis.call('HSET', ledger, 'state', 'ready', 'ldi', anchor, 'lg', lg, 'added', added, 'removed', removed,
      'count', lag)
    redis.call('HDEL', ledger, 'at')
    if done then return lag end
    return nil
  end
  redis.call('DEL', ledger)
  return nil
end
"""

# KEYS: stream, ledger. ARGV: group, budget. Returns the lag (integer), or the string "more" (call again).
COUNT_LAG = (
    _HELPERS
    + _LAG
    + r"""
local s = stream_info(KEYS[1])
if not s then return 0 end
local g = group_of(KEYS[1], ARGV[1])
if not g then return 0 end
if g['lag'] then return g['lag'] end
local lag = count_lag(KEYS[1], KEYS[2], s, g['last-delivered-id'], tonumber(ARGV[2]))
if lag == nil then return 'more' end
return lag
"""
)

# The whole snapshot of the queue in ONE call, as one JSON string (cheap to parse whatever the number of
# consumers): Redis' clock, DLQ length and oldest id, stream length, the group (last-delivered id, entries read,
# pending count, oldest pending id, lag), its consumers (name, pending, idle ms); when Redis reports the lag
# unknown, the first step of ``count_lag`` (lag_more = true: call COUNT_LAG until it answers).
# KEYS: stream, dlq, ledger. ARGV: group, lag budget. Cost: O(consumers) (+ the lag step, bounded by budget).
SNAPSHOT = (
    _HELPERS
    + _LAG
    + r"""
local stream, dlq, ledger, group = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local t = redis.call('TIME')
local out = {server_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), exists = false,
  group_exists = false, length = 0, dlq_length = redis.call('XLEN', dlq)}
local oldest = redis.call('XRANGE', dlq, '-', '+', 'COUNT', 1)
if #oldest > 0 then out.dlq_oldest_id = oldest[1][1] end
local s = stream_info(stream)
if not s then return cjson.encode(out) end
out.exists, out.length = true, s['length']
local g = group_of(stream, group)
if not g then return cjson.encode(out) end
out.group_exists = true
out.last_delivered_id = g['last-delivered-id']
if g['entries-read'] then out.entries_read = g['entries-read'] end
out.pending = g['pending']
if g['pending'] > 0 then out.oldest_pending_id = redis.call('XPENDING', stream, group, '-', '+', 1)[1][1] end
local consumers = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', stream, group)) do
  local x = kv(c)
  consumers[#consumers + 1] = {x['name'], x['pending'], x['idle']}
end
out.consumers = consumers
if g['lag'] then
  out.lag = g['lag']
else
  out.lag_counted = true
  out.lag = count_lag(stream, ledger, s, g['last-delivered-id'], tonumber(ARGV[2]))
  if out.lag == nil then out.lag_more = true end
end
return cjson.encode(out)
"""
)
