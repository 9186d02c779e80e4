"""The demo: a chat page over a deterministic fake model (``turnstream demo``)."""

from ._app import PROJECT_ID, create_demo_app
from ._fake import ProducerCalls, fake_reply

__all__ = ["PROJECT_ID", "ProducerCalls", "create_demo_app", "fake_reply"]
