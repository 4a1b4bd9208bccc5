
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function num(n)
  return string.format('%d', n)
end

local function id_seq(id)
  return tonumber(string.match(id, '^(%d+)'))
end

-- Drop the front entries added before cutoff (field t, first of each
-- entry); return the oldest seq kept, or nil when none is left.
local function trim_age(stream, cutoff)
  local count = 1
  while true do
    local batch = redis.call('XRANGE', stream, '-', '+', 'COUNT', count)
    if #batch == 0 then return nil end
    for i, entry in ipairs(batch) do
      if tonumber(entry[2][2]) >= cutoff then
        if i > 1 then redis.call('XTRIM', stream, 'MINID', entry[1]) end
        return id_seq(entry[1])
      end
    end
    redis.call('XTRIM', stream, 'MINID', num(id_seq(batch[#batch][1])) .. '-1')
    if #batch < count then return nil end
    count = 128
  end
end

-- Every room's seq on this Redis is at least this floor.  A Redis that
-- did not number the rooms' events so far (its run id is not the one that
-- did: a replica Sentinel promoted, or Redis restarted from its files) may
-- lack the last events another numbered: the floor then rises to the time
-- in ms (seqs stay below it), above every seq handed out before.
local function seq_floor(run_id, now)
  local floor = tonumber(redis.call('GET', 'happyrobot:seq-floor') or '0')
  if run_id == '' then return floor end
  local by = redis.call('GET', 'happyrobot:numbered-by')
  if by ~= run_id then
    if by then
      floor = math.max(now, floor + 1)
      redis.call('SET', 'happyrobot:seq-floor', string.format('%d', floor))
    end
    redis.call('SET', 'happyrobot:numbered-by', run_id)
  end
  return floor
end

-- Raise a room's seq from `from` to `to`, marking the jump in its stream
-- (an entry at `to` with field j = from): a reader that delivered up to
-- `from` continues after `to` with nothing missed.
local function jump(seq_key, stream, from, to, now, ttl)
  redis.call('XADD', stream, string.format('%d', to) .. '-0', 't', string.format('%d', now),
             'j', string.format('%d', from))
  redis.call('PEXPIRE', stream, ttl)
  redis.call('SET', seq_key, string.format('%d', to), 'PX', ttl)
  return to
end

-- The room's last seq, starting a new epoch (now in ms) when it is missing,
-- raised above the floor when below it (by at least 1000, should the room
-- have been numbered close to the time in ms).
local function current_seq(seq_key, stream, now, ttl, floor)
  local seq = redis.call('GET', seq_key)
  if seq then
    seq = tonumber(seq)
    if seq < floor then
      return jump(seq_key, stream, seq, math.max(floor, seq + 1000), now, ttl)
    end
    return seq
  end
  seq = math.max(now - 1, floor)
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if #last > 0 and id_seq(last[1][1]) > seq then seq = id_seq(last[1][1]) end
  redis.call('SET', seq_key, num(seq), 'PX', ttl)
  return seq
end
