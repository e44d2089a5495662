//! The Lua scripts of the Redis state store. Each touches only keys of one slot (their hash tag),
//! so in a Redis Cluster each runs on the master of that slot, atomically: its effects reach
//! replicas together (as one MULTI/EXEC in the replication stream), or not at all.

pub(super) const REPORT_SCRIPT: &str = r"
-- KEYS: device hash, observed hash, connected zset, pending hash, sequence (one slot)
-- ARGV: device, now ms, agent version, retention seconds, connection shown (0/1),
--       then (field, hash, hash shown (0/1)) triples
local prior = 'u'
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  prior = 'c'
elseif redis.call('HEXISTS', KEYS[1], 'seen') == 1 then
  prior = 'd'
end
redis.call('HSET', KEYS[1], 'seen', ARGV[2], 'version', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
local function pend(value)
  local id = ARGV[2] .. '-' .. redis.call('INCR', KEYS[5])
  redis.call('HSET', KEYS[4], id, value)
  redis.call('EXPIRE', KEYS[4], ARGV[4])
  return id
end
local connect_id = ''
if prior ~= 'c' then
  connect_id = pend('c|' .. ARGV[1] .. '|' .. prior .. '|' .. ARGV[5])
end
local changed = {}
for i = 6, #ARGV, 3 do
  local old = redis.call('HGET', KEYS[2], ARGV[i])
  if old ~= ARGV[i + 1] then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    local known = old and '1' or '0'
    changed[#changed + 1] = ARGV[i]
    changed[#changed + 1] = known
    changed[#changed + 1] = pend('o|' .. ARGV[1] .. '|' .. ARGV[i] .. '|' .. ARGV[i + 1] .. '|' .. known .. '|' .. ARGV[i + 2])
  end
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
return {prior, changed, connect_id}
";

pub(super) const SWEEP_SCRIPT: &str = r"
-- KEYS: connected zset, pending hash, sequence (one slot)
-- ARGV: cutoff ms, batch size, now ms, retention seconds, longest lag ms, issued at (the
-- caller's estimate of Redis' clock)
-- A sweep that runs long after it was issued (queued while Redis was paused or unreachable, its
-- caller long gone) judges with a cutoff from before the outage: it flips nothing.
local t = redis.call('TIME')
local lag = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[6])
if lag > tonumber(ARGV[5]) then
  return {'late', tostring(lag)}
end
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
if #stale > 0 then
  redis.call('ZREM', KEYS[1], unpack(stale))
  for _, device in ipairs(stale) do
    local id = ARGV[3] .. '-' .. redis.call('INCR', KEYS[3])
    redis.call('HSET', KEYS[2], id, 'd|' .. device)
    out[#out + 1] = id
    out[#out + 1] = device
  end
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return out
";

pub(super) const ADOPT_SCRIPT: &str = r"
-- KEYS: device hash, connected zset; ARGV: device, now ms, retention seconds
if redis.call('HEXISTS', KEYS[1], 'seen') == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'seen', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
";
