
local removed = 0
for i, instance in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    removed = removed + redis.call('HDEL', KEYS[1], instance)
  end
end
return removed
