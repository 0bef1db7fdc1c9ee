"""The HTTP engine a worker serves with: one wire protocol, one response writer, two thin app adapters.

A request's path through the files: `protocol.HttpProtocol` (bytes -> `request.Request`, limits,
timeouts, pipelining) -> an adapter, `wsgi.WsgiProtocol` or `asgi.AsgiProtocol` (+ `websocket` after an
upgrade), which calls the app -> `response.ResponseWriter` (compiled heads, framing, keep-alive) -> the
transport. `server.Server` holds what all connections of a worker share; `proxy` wraps an adapter when
the worker sits behind a trusted proxy; `loop` hides the running loop from WSGI app code. `fastlane`
puts the compiled lane (`_fast.c`) in front of the WSGI protocol for the common request shape (--engine).
"""
