"""loramux replicas on Ray Serve, routed by adapter through Ray's model multiplexing.

    app.py           the application (ingress over replicas), its builder for `serve run`, `loramux ray-serve`
    ingress.py       the OpenAI routes, relayed to a replica picked by the request's adapter
    replica.py       one engine + the `loramux serve` app; the multiplexed adapter loader
    store_mirror.py  a replica's registry kept in line with the shared adapter store
    asgi.py          a forwarded request through the app in-process, streamed back

Ray is an optional dependency (the `ray` extra); nothing else in loramux imports this package.
"""
