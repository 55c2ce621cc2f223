"""Ray Serve entry points.

`build_app` is the application builder named by deploy/serve.yaml (`import_path:
specrouter.serving.serve:build_app`); its `args` are a ServeConfig. `start` is what `specrouter serve` runs:
Serve's HTTP proxy and gRPC ingress on loopback (unless told otherwise) with the app deployed.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import ray
from ray import serve

from specrouter.core.spec import chain_summary
from specrouter.serving.config import API_KEY_ENV, ServeConfig
from specrouter.serving.server import SpecRouterServer, router_concurrency

APP_NAME = "specrouter"


class SpecRouterReplica(SpecRouterServer):
    """SpecRouterServer as a Serve replica. On a node whose address is loopback (the embedded local
    Ray), every server Ray runs listens on loopback alone, except the inter-deployment gRPC server
    Serve starts in each replica on every interface ("[::]:0"): bind that one to loopback too, before
    the replica starts it, so nothing the main job opens is reachable from another host."""

    def __init__(self, config: dict):
        if ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
            from ray.serve._private import replica

            add_port = replica.add_port_to_grpc_server
            replica.add_port_to_grpc_server = lambda server, address: add_port(server, address.replace("[::]", "127.0.0.1"))
        super().__init__(config)


def build_app(args: dict) -> serve.Application:
    """The Serve application for a validated config (a pydantic error names any bad field)."""
    config = ServeConfig.model_validate(args or {})
    deployment = serve.deployment(
        serve.ingress()(SpecRouterReplica),
        name="SpecRouter",
        ray_actor_options={"num_cpus": 0},  # waits on the router; the models' actors hold the CPUs
        max_ongoing_requests=router_concurrency(config) + 24,  # every admissible request, refusals, probes
        health_check_period_s=10,
    )
    return deployment.bind(config.model_dump())


@dataclass(frozen=True)
class Endpoints:
    http: str
    grpc: str


def served_chain() -> str:
    """The deployed app's chain, as `chain_summary` puts it (from its model card)."""
    card = serve.get_app_handle(APP_NAME).models.remote().result()["data"][0]
    return chain_summary(card["chain"], card["bit_exact_block"])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: may resolve to anything


def exposure_warning(config: ServeConfig, host: str) -> str | None:
    """A warning when the HTTP or gRPC API listens beyond loopback and no API key is required."""
    exposed = [f"{name} on {address}" for name, address, on in (("HTTP", host, True), ("gRPC", config.grpc_host, config.grpc_port is not None))
               if on and not is_loopback(address)]
    if not exposed or config.api_keys:
        return None
    return (f"WARNING: serving {' and '.join(exposed)}, beyond loopback, with no API key: anyone who can reach it "
            f"can use it. Set --api-key, --api-key-file or ${API_KEY_ENV}.")


class PortInUse(ValueError):
    """A port the server would listen on is taken here (another server listens on it)."""


def check_ports_free(config: ServeConfig, host: str, http_port: int) -> None:
    """Raise PortInUse if the HTTP or public gRPC port is taken here (another server is running):
    Serve's proxy would fail to bind it and retry in the background while that server answers."""
    for name, address, port, flag in (("HTTP", host, http_port, "--port"), ("gRPC", config.grpc_host, config.grpc_port, "--grpc-port")):
        if not port:
            continue
        try:
            family, kind, _, _, sockaddr = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as exc:
            raise ValueError(f"the {name} address {address!r} does not resolve ({exc.strerror})") from exc
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                raise PortInUse(f"cannot listen on {address}:{port} for {name} ({exc.strerror}); is another server "
                                f"running there? Choose another with {flag}.") from exc


def start(config: ServeConfig, host: str = "127.0.0.1", http_port: int = 8000) -> Endpoints:
    """Start Serve (on the Ray this process is connected to) and deploy SpecRouter; returns the URLs.
    Unless the config says, /metrics is open when HTTP is bound to loopback and keyed otherwise."""
    if config.metrics_need_key is None:
        config = config.model_copy(update={"metrics_need_key": not is_loopback(host)})
    serve.start(http_options={"host": host, "port": http_port})
    serve.run(build_app(config.model_dump()), name=APP_NAME, route_prefix="/", blocking=False)
    grpc = f"{config.grpc_host}:{config.grpc_port}" if config.grpc_port is not None else ""
    return Endpoints(http=f"http://{host}:{http_port}", grpc=grpc)
