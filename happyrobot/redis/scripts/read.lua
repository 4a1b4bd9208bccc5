
local now = now_ms()
local ttl = tonumber(ARGV[3])
local oldest = trim_age(KEYS[2], now - ttl)
local seq = current_seq(KEYS[1], KEYS[2], now, ttl)
local function read_after(from, reply)
  local entries = redis.call('XRANGE', KEYS[2], num(from + 1) .. '-0', num(seq) .. '-0')
  if #entries ~= seq - from then return nil end
  for _, entry in ipairs(entries) do
    reply[#reply + 1] = entry[2][4]
    reply[#reply + 1] = entry[2][6] or ''
  end
  return reply
end
local function not_kept(since)
  if ARGV[4] == '1' and oldest and oldest <= seq then
    -- Beyond HISTORY_SIZE but still in the stream (trimmed roughly): all of it.
    local reply = since >= oldest - 1 and since < seq and read_after(since, {seq, 1})
    if reply then return reply end
    reply = read_after(oldest - 1, {seq, 2, oldest - 1})
    if reply then return reply end
  end
  return {seq, 0}
end
if ARGV[1] == '' then return {seq, 0} end
local since = tonumber(ARGV[1])
if since > seq and ARGV[4] == '1' then
  -- An instance delivered up to since, so the numbering went backwards (a
  -- failover to a replica that lacked the last events, or an older
  -- snapshot): seqs up to since were handed out.  Number on above all of
  -- them, so that no new event takes a seq a member has seen; the instance
  -- sends RESYNC_REQUIRED at the new seq.  (A client's since is not
  -- trusted with this: it only gets {seq, 0}.)
  seq = math.max(now - 1, since + 1000000)
  redis.call('SET', KEYS[1], num(seq), 'PX', ttl)
  return {seq, 0}
end
if since > seq or seq - since > tonumber(ARGV[2]) then return not_kept(since) end
if since == seq then return {seq, 1} end
if not oldest or oldest > since + 1 then return not_kept(since) end
return read_after(since, {seq, 1}) or not_kept(since)
