"""`mha serve --frontends N`: N protocol processes in front of one engine process.

    supervisor  starts the engine, then N frontends on one port (SO_REUSEPORT); restarts a
                frontend that dies; exits non-zero when the engine dies; drains all on SIGTERM
    frontend    gRPC, TLS, tokens, parsing, encoding (mha.service.grpc's Server over a
                RemotePlane: the data plane's interface, answered by the engine)
    engine      the one DataPlane: sessions, batching, admission, sequences and their caches,
                statistics and /metrics
    link        between a frontend and the engine: small framed messages on a Unix socket,
                tensors in shared memory (arena) both ways, never pickled

Why: one event loop does all protocol work of a server; on a machine with cores to spare
that loop, not ONNX Runtime, bounds small requests (docs/performance.md, "Frontends").
"""
