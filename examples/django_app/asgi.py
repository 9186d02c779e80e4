"""turnstream on Django (ASGI): ``uvicorn examples.django_app.asgi:application`` from the
repository root.

    curl -N localhost:8000/chat -H 'X-User-Id: ada' -H 'Content-Type: application/json' \
         -d '{"sessionId": "s1", "turnIndex": 0, "message": "hello there"}'

Django answers ``POST /chat`` (``views.chat``); the middleware around it serves the turn
routes (``/turns/{id}/stream``, ``/cancel``, status) and the lifespan, which Django's
``ASGIHandler`` does not speak: the middleware notices and starts the supervisor itself.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")
django_application = get_asgi_application()  # sets Django up before the views are imported

from turnstream import TurnstreamMiddleware  # noqa: E402

from .views import authorize, supervisor  # noqa: E402

application = TurnstreamMiddleware(
    django_application, supervisor=supervisor, authorize=authorize
)
