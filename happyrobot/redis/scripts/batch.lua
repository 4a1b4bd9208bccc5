
local now = now_ms()
local ttl = tonumber(ARGV[4])
trim_age(KEYS[2], now - ttl)
local seq = current_seq(KEYS[1], KEYS[2], now, ttl, seq_floor(ARGV[#ARGV], now))
local first = seq + 1
local t = num(now)
local reply = {}
local parts = {}
for i = 0, tonumber(ARGV[5]) - 1 do
  local at = 6 + i * 4
  local tag = ARGV[at + 1]
  local k = tonumber(ARGV[at + 3])
  local dup = nil
  if k > 0 then
    local seen = redis.call('GET', KEYS[k])
    if seen then
      -- Kept while its event is in the history (whose front only moves
      -- forward within a script: trimmed by age above, by count below).
      local front = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
      if #front > 0 and tonumber(seen) >= id_seq(front[1][1]) then dup = tonumber(seen) end
    end
  end
  if dup then
    reply[#reply + 1] = dup
    reply[#reply + 1] = 1
  else
    seq = seq + 1
    local s = num(seq)
    local data = string.sub(ARGV[at], 1, -2) .. ',"seq":' .. s .. '}'
    if tag ~= '' then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], s .. '-0', 't', t, 'e', data, 's', tag)
    else
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], s .. '-0', 't', t, 'e', data)
    end
    if k > 0 then redis.call('SET', KEYS[k], s, 'PX', ttl) end
    parts[#parts + 1] = ARGV[at + 2] .. '\n' .. s .. '\n' .. num(#data) .. '\n' .. data
    reply[#reply + 1] = seq
    reply[#reply + 1] = 0
  end
end
if #parts > 0 then
  redis.call('SET', KEYS[1], num(seq), 'PX', ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('PUBLISH', ARGV[1], ARGV[2] .. num(first) .. '\n' .. table.concat(parts))
end
return reply
