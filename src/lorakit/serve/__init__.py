"""`lorakit serve`: many adapters on one base model behind an OpenAI-compatible HTTP server.

    params.py    SamplingParams, ServeError (OpenAI's error shape)
    engine.py    Engine: continuous batching across adapters through lorakit's mixed-adapter path
    sequence.py  SequenceHandle (events for threads and asyncio, cancel, result), TokenEvent, SequenceResult
    sampling.py  greedy / temperature / top_p per row with its own generator; streaming text with stop strings
    kv.py        the running sequences' KV caches as one left-padded batch: rows join and leave between steps
    registry.py  AdapterRegistry: names, validation, LRU residency (S-LoRA style paging), versions, mixes
    validation.py  an adapter directory checked in full against the model before it is registered
    model_names.py what a request's "model" and an adapter's name may be; mix strings "a:0.7+b:0.3"
    router.py    "model": "auto": the nearest adapter by sentence embedding
    app.py       create_app(...): the FastAPI app (OpenAI routes, SSE, errors, auth), metrics.py its /metrics
"""

from __future__ import annotations

from .engine import Engine
from .params import SamplingParams, ServeError
from .registry import AdapterRegistry, Target
from .router import Router
from .sequence import SequenceHandle, SequenceResult, TokenEvent

__all__ = ["SamplingParams", "ServeError", "Engine", "SequenceHandle", "SequenceResult", "TokenEvent",
           "AdapterRegistry", "Target", "Router"]
