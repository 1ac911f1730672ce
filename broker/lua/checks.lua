-- ARGV[first] = n_checks, then per check: field, n_values, values... Values are JSON-encoded by the
-- caller, so the checks compare strings. Returns the index after the checks, or nil if one fails.
local function checks_hold(first)
  local i = first + 1
  for _ = 1, tonumber(ARGV[first]) do
    local field = ARGV[i]
    local n = tonumber(ARGV[i + 1])
    local current = redis.call('HGET', KEYS[1], field)
    if current == false then current = 'null' end
    local ok = false
    for j = i + 2, i + 1 + n do
      if ARGV[j] == current then ok = true end
    end
    if not ok then return nil end
    i = i + 2 + n
  end
  return i
end
