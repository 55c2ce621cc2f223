"""SpecRouter: lossless multi-level speculative decoding, served on Ray.

The public names, imported on first use so that `import specrouter` stays light (the SDK needs
neither torch nor Ray):

    from specrouter import Engine, SamplingParams, Client

Layers, each importing only those above it in this list:
    core/     sampling, verification, sequences, models and their workers, levels, the chain step
    tasks/    TaskSpec: corpora, prompt encoders, task discovery, drafter alignment
    routing/  costs, acceptance, the latency model, the classifier, the adaptive router
    engine/   the generation loop, calibration, the text frontend
    runtime/  Ray actors (one per model) and the gRPC data plane between them
    serving/  the Ray Serve app, OpenAI HTTP, the public gRPC service and SDK, configuration
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SamplingParams": "specrouter.core.sampling",
    "LevelSpec": "specrouter.core.spec",
    "parse_chain": "specrouter.core.spec",
    "AdaptiveRouter": "specrouter.routing.router",
    "router_for": "specrouter.engine.calibration",
    "Engine": "specrouter.engine.engine",
    "GenerationResult": "specrouter.engine.loop",
    "BatchLoop": "specrouter.engine.loop",
    "Frontend": "specrouter.engine.frontend",
    "ServeConfig": "specrouter.serving.config",
    "Client": "specrouter.serving.client",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'specrouter' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
