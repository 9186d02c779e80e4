"""The smallest Django settings that serve the example: no database, no apps, no middleware.

A real project keeps its own settings; what turnstream needs is only an ASGI server (see
``asgi.py``). With ``CsrfViewMiddleware`` on, the chat view is ``csrf_exempt`` (it takes a
JSON POST authenticated by a header, which a cross-site form cannot send).
"""

SECRET_KEY = "turnstream-example-not-secret"  # an example, never deployed
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "examples.django_app.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
