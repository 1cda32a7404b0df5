"""Lua scripts of the queue recovery: every move of a pending entry is ONE atomic server-side step.

Each script re-checks, inside Redis, the condition the Python decision relied on (entry still pending, still
idle enough or still owned by the same dead consumer), so a concurrent sweep, a late ACK or a worker that
claimed the entry meanwhile makes the step a harmless no-op instead of a duplicate.
"""

from __future__ import annotations

# Read-only page of the pending list, enriched from the entries themselves.
# KEYS: stream. ARGV: group, start (inclusive id, "(id" exclusive or "-"), count, consumer ("" = all).
# Returns a flat array, 8 items per pending entry:
#   id, consumer, idle_ms, deliveries, exists (1/0), attempts (text, "0" if absent), job_id, step_id.
# Cost: one XPENDING (O(count) + log N) plus one XRANGE id id (O(log N)) per entry.
SCAN_PENDING = r"""
local p
if ARGV[4] ~= '' then
  p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], '+', tonumber(ARGV[3]), ARGV[4])
else
  p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], '+', tonumber(ARGV[3]))
end
local out = {}
local n = 0
for _, e in ipairs(p) do
  local id = e[1]
  local r = redis.call('XRANGE', KEYS[1], id, id)
  local exists, attempts, job, step = 0, '0', '', ''
  if #r > 0 then
    exists = 1
    local f = r[1][2]
    for j = 1, #f, 2 do
      local k = f[j]
      if k == 'attempts' then attempts = f[j + 1]
      elseif k == 'job_id' then job = f[j + 1]
      elseif k == 'step_id' then step = f[j + 1] end
    end
  end
  out[n + 1] = id; out[n + 2] = e[2]; out[n + 3] = e[3]; out[n + 4] = e[4]
  out[n + 5] = exists; out[n + 6] = attempts; out[n + 7] = job; out[n + 8] = step
  n = n + 8
end
return out
"""

# Act on a batch of decided pending entries.
# KEYS: stream, dlq. ARGV: group, min_idle_ms, claim_consumer, then 4 items per entry:
#   id, action (R = requeue, D = dead-letter, O = orphan ack, C = claim), owner ("" = re-check idle >=
#   min_idle_ms; a name = re-check the entry is still owned by that (dead) consumer), reason.
# Returns a flat array, 3 items per entry: id, status, new id ("" when none). Statuses:
#   requeued, dead_lettered, orphan_acked, claimed, skipped_gone (no longer pending: acked or taken),
#   skipped_busy (no longer idle enough), skipped_moved (now owned by another consumer).
# Requeue: XADD a copy of the fields with attempts = attempts + deliveries, then XACK the original.
# Dead-letter: XADD to the DLQ the runbook's fields (job_id, error) plus the original id, fields (JSON),
# total deliveries, last consumer, reason and time, then XACK. Orphan (entry deleted/trimmed): XACK only.
ACT_PENDING = r"""
local stream, dlq = KEYS[1], KEYS[2]
local group, min_idle, claimer = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local t = redis.call('TIME')
local now_ms = tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local out = {}
local n = 0
for i = 4, #ARGV, 4 do
  local id, action, owner, reason = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local status, new_id = '', ''
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  if #p == 0 then
    status = 'skipped_gone'
  elseif owner ~= '' and p[1][2] ~= owner then
    status = 'skipped_moved'
  elseif owner == '' and p[1][3] < min_idle then
    status = 'skipped_busy'
  else
    local last_consumer, deliveries = p[1][2], p[1][4]
    local r = redis.call('XRANGE', stream, id, id)
    if #r == 0 then
      redis.call('XACK', stream, group, id)
      status = 'orphan_acked'
    elseif action == 'O' then
      status = 'skipped_moved'
    elseif action == 'C' then
      -- JUSTID alone would not count a delivery; the claim is one, so count it like XAUTOCLAIM does.
      redis.call('XCLAIM', stream, group, claimer, 0, id, 'RETRYCOUNT', deliveries + 1, 'JUSTID')
      status = 'claimed'
    else
      local f = r[1][2]
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
        redis.call('XACK', stream, group, id)
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
        redis.call('XACK', stream, group, id)
        status = 'dead_lettered'
      else
        return redis.error_reply('unknown action ' .. action)
      end
    end
  end
  out[n + 1] = id; out[n + 2] = status; out[n + 3] = new_id
  n = n + 3
end
return out
"""

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
