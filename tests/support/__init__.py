"""The real-socket test rig: an origin, raw echo server, fake and Debian upstream proxies.

Everything here listens and connects on loopback only (127.0.0.0/8 and ::1).

- `tests.support.net`: the shared asyncio TCP server base, the half-closing relay, port helpers.
- `tests.support.origin`: an HTTP/1.1 origin (plain and TLS) and a raw TCP `EchoServer`.
- `tests.support.fake_upstreams`: `FakeHttpProxy` and `FakeSocks5Proxy` with faults on demand.
- `tests.support.debian_proxies`: `microsocks` and `tinyproxy` run as honest upstreams.
- `tests.support.fixtures`: pytest fixtures over all of the above (see its docstring for wiring).
"""
