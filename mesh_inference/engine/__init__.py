"""The inference engine: backends that build llama.cpp command lines, and the process supervisor.

Public API (re-exported)::

    EngineUnavailable, EngineBackend, BinaryBackend, EmbeddedBackend, find_backend
    ProcessSupervisor, SupervisorEvent,
    EngineStarting, EngineReady, EngineExited, EngineRestartScheduled

``embedded_rpc`` and ``embedded_server`` are ``python -m`` entry points run as
child processes by the embedded backend; they are not imported here because
they load llama.cpp's native libraries.
"""

from mesh_inference.engine.backends import (
    BinaryBackend,
    EmbeddedBackend,
    EngineBackend,
    EngineUnavailable,
    find_backend,
)
from mesh_inference.engine.supervisor import (
    EngineExited,
    EngineReady,
    EngineRestartScheduled,
    EngineStarting,
    ProcessSupervisor,
    SupervisorEvent,
)

__all__ = [
    "BinaryBackend",
    "EmbeddedBackend",
    "EngineBackend",
    "EngineExited",
    "EngineReady",
    "EngineRestartScheduled",
    "EngineStarting",
    "EngineUnavailable",
    "ProcessSupervisor",
    "SupervisorEvent",
    "find_backend",
]
