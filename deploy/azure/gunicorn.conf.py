"""gunicorn settings for the App Service API; startup.sh runs gunicorn with them.

The app is the `api` role of cqrskit (cqrskit.api.asgi), served by uvicorn
workers. Everything else is configured by CQRSKIT_* app settings (Settings): the
address and port (CQRSKIT_HOST=0.0.0.0 and CQRSKIT_PORT=8000 on App Service), and
whether commands and queries are forwarded to the Function apps
(CQRSKIT_COMMAND_HANDLER_URL, CQRSKIT_QUERY_HANDLER_URL) or handled in process.
The number of workers is gunicorn's own WEB_CONCURRENCY (default 1).
"""

from cqrskit.api.auth import refuse_exposed_without_auth
from cqrskit.config import Settings

_settings = Settings()
# The secure default of `cqrskit api`: no listening beyond loopback without
# CQRSKIT_AUTH. Raised here, it stops gunicorn before it binds, with the reason.
refuse_exposed_without_auth(_settings)

wsgi_app = "cqrskit.api.asgi:create()"
# uvicorn's own gunicorn worker (uvicorn.workers) is deprecated for this package.
worker_class = "uvicorn_worker.UvicornWorker"
bind = [f"{_settings.host}:{_settings.port}"]
loglevel = _settings.log_level.lower()
# Nobody runs gunicornc on App Service, and one fixed socket path would be shared by
# every gunicorn on a machine.
control_socket_disable = True
# On SIGTERM (a restart, a scale-in), requests in flight get this long to finish.
graceful_timeout = 30
