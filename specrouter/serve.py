"""Ray Serve entry points.

`build_app` is the application builder named by deploy/serve.yaml (`import_path:
specrouter.serve:build_app`); its `args` are a ServeConfig. `start` is what `specrouter serve` runs:
Serve's HTTP proxy and gRPC ingress on loopback (unless told otherwise) with the app deployed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray import serve

from specrouter.config import ServeConfig
from specrouter.server import SpecRouterServer

APP_NAME = "specrouter"


def build_app(args: dict) -> serve.Application:
    """The Serve application for a validated config (a pydantic error names any bad field)."""
    config = ServeConfig.model_validate(args or {})
    deployment = serve.deployment(
        serve.ingress()(SpecRouterServer),
        name="SpecRouter",
        ray_actor_options={"num_cpus": 0},  # waits on the router; the models' actors hold the CPUs
        max_ongoing_requests=64,
        health_check_period_s=10,
    )
    return deployment.bind(config.model_dump())


@dataclass(frozen=True)
class Endpoints:
    http: str
    grpc: str


def start(config: ServeConfig, host: str = "127.0.0.1", http_port: int = 8000) -> Endpoints:
    """Start Serve (on the Ray this process is connected to) and deploy SpecRouter; returns the URLs."""
    serve.start(http_options={"host": host, "port": http_port})
    serve.run(build_app(config.model_dump()), name=APP_NAME, route_prefix="/", blocking=False)
    grpc = f"{config.grpc_host}:{config.grpc_port}" if config.grpc_port is not None else ""
    return Endpoints(http=f"http://{host}:{http_port}", grpc=grpc)
