"""The Ray Serve app of the HTTP service: one deployment with the FastAPI ingress of
``service.api``.

- ``serve run service.app:app``: settings from the env vars (``service.settings``);
- ``serve run service.app:build_app workspace=... tokens_file=... data_roots=...``: an
  application builder, its args over the env vars;
- ``medcurate serve``: the same app on a local Ray of its own, or on a cluster.

The ingress app is built in each replica from the settings it is given (``@serve.ingress()``
with ``__serve_build_asgi_app__``), so limits and tokens need no module globals. Ray Jobs need
the dashboard: run this on a cluster started with it (``ray start --head`` has it). Metrics:
Ray Serve exports its own Prometheus metrics (``ray_serve_num_http_requests``,
``ray_serve_http_request_latency_ms``, ``ray_serve_num_http_error_requests``, replica queue
lengths, ...) through Ray's metrics endpoint on every node; the service adds none.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from medcurate.runtime import stage_resources
from service.api import create_api
from service.settings import Settings


@serve.deployment
@serve.ingress()
class MedcurateAPI:
    """CPUs and requests at once as ``runtime.stage_resources("serve_replica")`` declares
    them (``application``): selections run in the request on its threads, one CPU's worth.
    128 requests at once: ``?wait=true`` waits hold no thread
    (at most ``service.api.MAX_WAITING`` of them), ``/v1/health`` runs on the event loop, and
    the other routes share FastAPI's thread pool (40 threads), so health always gets in."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def __serve_build_asgi_app__(self):
        return create_api(self.settings)


def application(settings: Settings) -> Application:
    resources = stage_resources("serve_replica")
    threads = str(resources.threads)
    env = {name: threads for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                      "MKL_NUM_THREADS")}
    return MedcurateAPI.options(
        num_replicas=settings.replicas, max_ongoing_requests=resources.concurrency,
        ray_actor_options={"num_cpus": resources.num_cpus, "runtime_env": {"env_vars": env}},
    ).bind(settings)


def build_app(args: dict) -> Application:
    """Application builder for ``serve run``: ``args`` are Settings fields (and ``tokens_file``)."""
    return application(Settings.load(args))


def __getattr__(name: str):
    """``service.app:app`` is built on first use, so importing ``build_app`` needs no env."""
    if name == "app":
        return build_app({})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
