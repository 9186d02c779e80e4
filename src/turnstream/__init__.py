"""turnstream: durable, replayable, re-attachable chat turns for ASGI apps."""

from ._adapter import (
    ReconnectAdapter,
    RunHandle,
    StartRequest,
    SubstrateCancelled,
    SubstrateFailed,
    SupervisedEvent,
)
from ._authorize import Principal, authorize_request
from ._events import LoggedEvent, NewEvent
from ._exceptions import (
    AdapterError,
    Forbidden,
    InvalidTurnInput,
    LeaseLost,
    OwnerLost,
    PayloadTooLarge,
    RequestTimeout,
    RunFinished,
    RunNotFound,
    StoreError,
    StoreUnavailable,
    TurnInputMismatch,
    TurnstreamError,
    Unauthorized,
)
from ._framing import StreamFormat
from ._handler import ChatTurnResult, handle_chat_turn
from ._health import ReadinessCheck, readiness
from ._hooks import Limits, TurnCompletion, TurnContext, TurnHooks
from ._identity import TurnIdentity, canonical_input_hash, derive_execution_id, parse_execution_id
from ._middleware import TurnstreamMiddleware
from ._problems import ProblemResponse, problem_for_exception
from ._redact import Redact
from ._requests import ChatTurnRequest, read_json_body
from ._store import BeginOutcome, Lease, RunKey, RunRecord, RunStatus, TurnStore
from ._supervisor import Supervisor
from .stores import MemoryStore

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "BeginOutcome",
    "ChatTurnRequest",
    "ChatTurnResult",
    "Forbidden",
    "InvalidTurnInput",
    "Lease",
    "LeaseLost",
    "Limits",
    "LoggedEvent",
    "MemoryStore",
    "NewEvent",
    "OwnerLost",
    "PayloadTooLarge",
    "Principal",
    "ProblemResponse",
    "ReadinessCheck",
    "ReconnectAdapter",
    "Redact",
    "RedisStore",
    "RequestTimeout",
    "RunFinished",
    "RunHandle",
    "RunKey",
    "RunNotFound",
    "RunRecord",
    "RunStatus",
    "StartRequest",
    "StoreError",
    "StoreUnavailable",
    "StreamFormat",
    "SubstrateCancelled",
    "SubstrateFailed",
    "SupervisedEvent",
    "Supervisor",
    "TurnCompletion",
    "TurnContext",
    "TurnHooks",
    "TurnIdentity",
    "TurnInputMismatch",
    "TurnStore",
    "TurnstreamError",
    "TurnstreamMiddleware",
    "Unauthorized",
    "authorize_request",
    "canonical_input_hash",
    "derive_execution_id",
    "handle_chat_turn",
    "parse_execution_id",
    "problem_for_exception",
    "read_json_body",
    "readiness",
]


def __getattr__(name: str) -> object:
    # RedisStore pulls in redis-py; import it only for apps that use it.
    if name == "RedisStore":
        from .stores.redis import RedisStore

        return RedisStore
    raise AttributeError(f"module 'turnstream' has no attribute {name!r}")
