
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

-- The room's last seq, starting a new epoch (now in ms) when it is missing.
local function current_seq(seq_key, stream, now, ttl)
  local seq = redis.call('GET', seq_key)
  if seq then return tonumber(seq) end
  seq = now - 1
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if #last > 0 and id_seq(last[1][1]) > seq then seq = id_seq(last[1][1]) end
  redis.call('SET', seq_key, num(seq), 'PX', ttl)
  return seq
end
