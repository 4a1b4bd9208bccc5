
local now = now_ms()
local ttl = tonumber(ARGV[3])
local size = tonumber(ARGV[2])
local kept = ARGV[4] == '1'
local oldest = trim_age(KEYS[2], now - ttl)
local seq = current_seq(KEYS[1], KEYS[2], now, ttl, seq_floor(ARGV[5], now))
if not oldest then  -- the jump just made may have left the only entry
  local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
  oldest = first and id_seq(first[1])
end
-- Append the events after `from` up to seq (event, sender tag) to reply;
-- nil unless every one is there (and, with a limit, at most that many).  A
-- jump of the numbering (an entry with field j: the seq jumped from j to
-- its own) continues them only if it jumped from the seq before; with
-- kept it is passed on as ('', its seq).
local function read_after(from, reply, limit)
  local entries
  if limit then
    entries = redis.call('XRANGE', KEYS[2], num(from + 1) .. '-0', num(seq) .. '-0',
                         'COUNT', limit + 2)
  else
    entries = redis.call('XRANGE', KEYS[2], num(from + 1) .. '-0', num(seq) .. '-0')
  end
  local want, events = from + 1, 0
  for _, entry in ipairs(entries) do
    local n, fields = id_seq(entry[1]), entry[2]
    if fields[3] == 'j' then
      if tonumber(fields[4]) ~= want - 1 then return nil end
      if kept then
        reply[#reply + 1] = ''
        reply[#reply + 1] = num(n)
      end
    elseif n ~= want then
      return nil
    else
      reply[#reply + 1] = fields[4]
      reply[#reply + 1] = fields[6] or ''
      events = events + 1
    end
    want = n + 1
  end
  if want ~= seq + 1 or (limit and events > limit) then return nil end
  return reply
end
-- Whether the stream may hold every event after since: its oldest entry
-- is the one after since, or a jump from since.
local function reaches(since)
  if not oldest then return false end
  if oldest <= since + 1 then return true end
  local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
  return first[2][3] == 'j' and tonumber(first[2][4]) == since
end
-- With kept: the events at the end of the stream that follow each other
-- up to seq, after the newest jump if any: {seq, 2, the seq before them,
-- events...}.
local function kept_tail()
  local entries = redis.call('XREVRANGE', KEYS[2], num(seq) .. '-0', '-')
  local want, start, tail = seq, seq, {}
  for _, entry in ipairs(entries) do
    local n, fields = id_seq(entry[1]), entry[2]
    if n ~= want then break end
    if fields[3] == 'j' then break end
    tail[#tail + 1] = entry
    start, want = n - 1, n - 1
  end
  local reply = {seq, 2, start}
  for i = #tail, 1, -1 do
    reply[#reply + 1] = tail[i][2][4]
    reply[#reply + 1] = tail[i][2][6] or ''
  end
  return reply
end
local function not_kept(since)
  if kept and oldest and oldest <= seq then
    -- Beyond HISTORY_SIZE but still in the stream (trimmed roughly): all of it.
    local reply = since < seq and reaches(since) and read_after(since, {seq, 1}, nil)
    if reply then return reply end
    return kept_tail()
  end
  return {seq, 0}
end
if ARGV[1] == '' then return {seq, 0} end
local since = tonumber(ARGV[1])
if since > seq and kept then
  -- An instance delivered up to since, so the numbering went backwards
  -- without a change of Redis (the floor covers those): seqs up to since
  -- were handed out.  Number on above them; its members get
  -- RESYNC_REQUIRED at the new seq.  (A client's since is not trusted with
  -- this: it only gets {seq, 0}.)
  seq = jump(KEYS[1], KEYS[2], seq, math.max(now, since + 1000), now, ttl)
  return {seq, 0}
end
if since > seq then return not_kept(since) end
if since == seq then return {seq, 1} end
if not reaches(since) then return not_kept(since) end
return read_after(since, {seq, 1}, size) or not_kept(since)
