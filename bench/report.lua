-- wrk script for bench/run.py. Env: BENCH_CLOSE=1 sends `Connection: close` (a new connection per request);
-- BENCH_PIDS=1 counts responses per X-Pid header (which worker answered). When wrk is done it prints one
-- JSON line of counts and latency percentiles (microseconds) and one of the per-pid counts.
if os.getenv("BENCH_CLOSE") == "1" then
  wrk.headers["Connection"] = "close"
end

local threads = {}
setup = function(thread)
  table.insert(threads, thread)
end

if os.getenv("BENCH_PIDS") == "1" then
  pids = {}
  response = function(status, headers, body)
    local p = headers["X-Pid"] or headers["x-pid"] or "?"
    pids[p] = (pids[p] or 0) + 1
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
  local total, parts = {}, {}
  for _, t in ipairs(threads) do
    local counts = t:get("pids")
    if counts then
      for p, n in pairs(counts) do total[p] = (total[p] or 0) + n end
    end
  end
  for p, n in pairs(total) do table.insert(parts, string.format('"%s":%d', p, n)) end
  io.write("BENCH_PIDS {" .. table.concat(parts, ",") .. "}\n")
end
