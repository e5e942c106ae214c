"""loramux replicas on Ray Serve, routed by adapter through Ray's model multiplexing.

    app.py           the application (ingress over replicas), its builder for `serve run`, `loramux ray-serve`
    ingress.py       the OpenAI routes, relayed to a replica picked by the request's adapter
    replica.py       one engine + the `loramux serve` app; the multiplexed adapter loader
    store_mirror.py  a replica's registry kept in line with the shared adapter store
    asgi.py          a forwarded request through the app in-process, streamed back

Ray is an optional dependency (the `ray` extra); nothing else in loramux imports this package.
"""
import os
import sys

# Ray puts its driver's working directory on every worker's sys.path. A driver
# started in a loramux checkout would make the checkout's kernels/ a top-level
# `kernels` in the replicas, in place of Hugging Face's package that
# transformers imports. Replicas import this package before transformers.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _CHECKOUT]
