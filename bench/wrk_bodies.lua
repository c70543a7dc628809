-- wrk script of bench.saturation: POSTs pre-signed, distinct Sentry webhooks.
-- BENCH_BODIES: file of "signature<TAB>body" lines; BENCH_PATH: request path; BENCH_THREADS: -t.
-- Thread n sends lines n, n + threads, n + 2 * threads, ... (wrapping around at the end).
local bodies_file = os.getenv("BENCH_BODIES")
local path = os.getenv("BENCH_PATH")
local stride = tonumber(os.getenv("BENCH_THREADS") or "1")
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

function init(args)
  signatures, bodies = {}, {}
  for line in io.lines(bodies_file) do
    local tab = line:find("\t", 1, true)
    signatures[#signatures + 1] = line:sub(1, tab - 1)
    bodies[#bodies + 1] = line:sub(tab + 1)
  end
  index = id
end

function request()
  local i = index % #bodies + 1
  index = index + stride
  return wrk.format("POST", path, {
    ["Content-Type"] = "application/json",
    ["Sentry-Hook-Resource"] = "issue",
    ["Sentry-Hook-Signature"] = signatures[i],
  }, bodies[i])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"non2xx":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"timeouts":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
