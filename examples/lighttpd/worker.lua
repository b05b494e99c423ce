-- Answers every request with `worker ID pid PID`: ID is cluster-lb's worker id
-- (CLUSTER_LB_WORKER_ID), PID this lighttpd process (Lua's standard library has no getpid; the
-- first field of /proc/self/stat is it).
local stat = io.open("/proc/self/stat")
local pid = stat and stat:read("*n") or "-"
if stat then stat:close() end
local worker = os.getenv("CLUSTER_LB_WORKER_ID") or "-"
lighty.r.resp_header["Content-Type"] = "text/plain"
lighty.r.resp_body:set("worker " .. worker .. " pid " .. pid .. "\n")
return 200
