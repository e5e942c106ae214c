"""The checkout's folders are the packages loramux.*, never top-level ones.

transformers imports Hugging Face's `kernels` distribution; with the checkout
on sys.path, the checkout's kernels/ would answer that import instead.
"""
import os
import subprocess
import sys

from helpers.live_server import ROOT


def python_in_checkout(code: str) -> subprocess.CompletedProcess:
    """`python -c code` run in the checkout, where the checkout is sys.path[0]."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_kernels_found_as_a_top_level_package_says_how_to_run():
    proc = python_in_checkout("import kernels")
    assert proc.returncode != 0
    assert "imported as 'kernels', not as loramux.kernels" in proc.stderr
    assert "PYTHONSAFEPATH=1" in proc.stderr


def test_the_ray_replica_package_takes_the_checkout_off_sys_path():
    # Ray puts its driver's working directory on the replicas' sys.path
    proc = python_in_checkout(
        "import sys, loramux.server.ray_serve, transformers.activations; print('' in sys.path)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False"]


def test_servers_the_benchmarks_start_import_transformers_from_a_checkout():
    # `python -P -m loramux.bench.x` does not pass -P on to the servers it starts: serve_argv must
    from loramux.bench.common import serve_argv

    argv = serve_argv("--port", "1")
    flags = argv[1:argv.index("-m")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    proc = subprocess.run([argv[0], *flags, "-c", "import transformers.activations"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert argv[argv.index("-m") + 1:][:2] == ["loramux.server", "serve"]
