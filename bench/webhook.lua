-- wrk script: generic-platform webhooks, a unique message_id per request.
-- wrk -t1 -c64 -d5s -s bench/webhook.lua URL -- <conversations> <prefix> [<offset>]
-- message_id is "<prefix><thread>-<n>"; conversation_id and sender.id cycle over <conversations>,
-- numbered from <offset> (0): c-<offset>..c-<offset + conversations - 1>.
-- done() prints one line "BENCH_JSON {...}" for bench/loadgen.py to parse.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

local conversations = 100
local prefix = "m"
local offset = 0
local counter = 0
local fmt = '{"message_id":"%s%d-%d","conversation_id":"c-%d","sender":{"id":"u-%d"},"type":"text","text":"hello"}'

function init(args)
  conversations = tonumber(args[1]) or 100
  prefix = args[2] or "m"
  offset = tonumber(args[3]) or 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local k = offset + counter % conversations
  return wrk.format(nil, nil, nil, string.format(fmt, prefix, tid, counter, k, k))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_s":%.6f,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"non_2xx":%d,"timeouts":%d,"p50_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f}\n',
    summary.requests, summary.duration / 1e6, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3))
end
