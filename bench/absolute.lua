-- wrk has no proxy option: send absolute-form request lines to the proxy wrk connects to.
-- The target URL comes from the environment (WRK_TARGET=http://127.0.0.1:PORT/small).
local target = os.getenv("WRK_TARGET")
wrk.path = target
wrk.headers["Host"] = target:match("^%a+://([^/]+)")
