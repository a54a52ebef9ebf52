-- wrk script: every request a new conversation (and sender), for the memory scenario.
-- wrk -t1 -c16 -d300s -s bench/fresh.lua URL -- <prefix> <stop_after>
-- message_id "<prefix>-<n>", conversation_id "c<prefix>-<n>", sender.id "u<prefix>-<n>"; the thread stops
-- once <stop_after> requests were answered 2xx (a few more may be in flight: the store has the count).
-- done() prints one line "BENCH_JSON {...}" for bench/loadgen.py to parse.

local prefix = "f"
local stop_after = 1000
local counter = 0
local ok = 0
local fmt = '{"message_id":"%s-%d","conversation_id":"c%s-%d","sender":{"id":"u%s-%d"},"type":"text","text":"hello"}'

function init(args)
  prefix = args[1] or "f"
  stop_after = tonumber(args[2]) or 1000
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, string.format(fmt, prefix, counter, prefix, counter, prefix, counter))
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
    if ok >= stop_after then
      wrk.thread:stop()
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_s":%.6f,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"non_2xx":%d,"timeouts":%d,"p50_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f}\n',
    summary.requests, summary.duration / 1e6, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3))
end
