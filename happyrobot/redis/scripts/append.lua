
local now = now_ms()
local ttl = tonumber(ARGV[5])
local oldest = trim_age(KEYS[2], now - ttl)
current_seq(KEYS[1], KEYS[2], now, ttl, seq_floor(ARGV[7], now))
if KEYS[3] then
  local seen = redis.call('GET', KEYS[3])
  if seen and oldest and tonumber(seen) >= oldest then
    return {tonumber(seen), 1}
  end
end
local seq = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ttl)
local s = num(seq)
local data = string.sub(ARGV[1], 1, -2) .. ',"seq":' .. s .. '}'
if ARGV[6] ~= '' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], s .. '-0',
             't', num(now), 'e', data, 's', ARGV[6])
else
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], s .. '-0', 't', num(now), 'e', data)
end
redis.call('PEXPIRE', KEYS[2], ttl)
if KEYS[3] then redis.call('SET', KEYS[3], s, 'PX', ttl) end
redis.call('PUBLISH', ARGV[2], ARGV[3] .. s .. '\n' .. data)
return {seq, 0}
