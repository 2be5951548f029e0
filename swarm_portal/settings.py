"""Django settings, read only from environment variables (see the README's table)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from swarm_portal.env import env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("SWARM_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY", "insecure-debug-only-key", required=not DEBUG)
if not DEBUG and len(SECRET_KEY) < 32:
    raise ImproperlyConfigured("environment variable SECRET_KEY must be at least 32 characters")
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])


def _database(url: str) -> dict:
    try:
        config = dj_database_url.parse(url, conn_max_age=60, conn_health_checks=True)
    except ValueError as exc:
        raise ImproperlyConfigured(f"environment variable DATABASE_URL is invalid: {exc}") from None
    if config["ENGINE"] == "django.db.backends.sqlite3":
        if config["NAME"] and config["NAME"] != ":memory:":
            Path(config["NAME"]).parent.mkdir(parents=True, exist_ok=True)
        # WAL and IMMEDIATE let the portal, Celery and tests share one SQLite file.
        config["CONN_MAX_AGE"] = 0
        config["OPTIONS"] = {
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        }
    return config


DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'swarm.sqlite3'}")
DATABASES = {"default": _database(DATABASE_URL)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", "")
if REDIS_URL and not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
    raise ImproperlyConfigured("environment variable REDIS_URL must start with redis://")

ARTIFACT_ROOT = Path(env_str("ARTIFACT_ROOT", str(VAR_DIR / "artifacts")))
MAX_UPLOAD_BYTES = env_int("MAX_UPLOAD_BYTES", 4 * 1024**3, minimum=1024)
VALIDATION_TIMEOUT_S = env_float("VALIDATION_TIMEOUT_S", 120.0, minimum=1.0)
VALIDATION_MEMORY_BYTES = env_int("VALIDATION_MEMORY_BYTES", 8 * 1024**3, minimum=256 * 1024**2)
# Checked from the zip's directory before anything inflates (swarm_protocol/archive.py).
ARCHIVE_MAX_UNCOMPRESSED_BYTES = env_int("ARCHIVE_MAX_UNCOMPRESSED_BYTES",
                                         VALIDATION_MEMORY_BYTES, minimum=1024**2)
ARCHIVE_MAX_RATIO = env_float("ARCHIVE_MAX_RATIO", 200.0, minimum=1.0)
VALIDATION_CONCURRENCY = env_int("VALIDATION_CONCURRENCY", 2, minimum=1)
VALIDATION_QUEUE_WAIT_S = env_float("VALIDATION_QUEUE_WAIT_S", 5.0, minimum=0.0)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "knox",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "registry",
    "serving",
    "scaling",
    "dashboards",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "swarm_portal.middleware.LoginRequiredMiddleware",
]

ROOT_URLCONF = "swarm_portal.urls"
ASGI_APPLICATION = "swarm_portal.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "registry:model-list"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns on a missing root
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Pages work without a collectstatic step in development and tests.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# Uploads: non-file fields stay small; artifacts stream to disk through our own handler.
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024**2
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024**2
FILE_UPLOAD_TEMP_DIR = None

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "knox.auth.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "swarm_portal.openapi.PortalAutoSchema",
    # One gate per kind of input (swarm_portal/api.py): JSON bodies only (the artifact
    # upload view names multipart itself), bounded paging, checked query strings.
    "DEFAULT_PARSER_CLASSES": ["swarm_portal.api.BoundedJSONParser"],
    "DEFAULT_PAGINATION_CLASS": "swarm_portal.api.BoundedPagination",
    "DEFAULT_FILTER_BACKENDS": ["swarm_portal.api.QueryFilters"],
    "PAGE_SIZE": 100,
    "EXCEPTION_HANDLER": "swarm_portal.api.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Swarm Portal API",
    "DESCRIPTION": "Management API: model registry, GPU servers, deployments and scaling.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    # Swagger UI from the vendored sidecar package: the portal works with no internet.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums",
                             "swarm_portal.openapi.postprocess_schema"],
}

# API tokens: stored as digests (shown once at creation), `Authorization: Token swp_...`.
REST_KNOX = {
    "TOKEN_PREFIX": "swp_",
    "TOKEN_TTL": timedelta(days=env_int("API_TOKEN_TTL_DAYS", 90, minimum=1)),
    "AUTO_REFRESH": False,
}

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # Several deployments (or test runs) may share one Redis: keep groups apart.
            "CONFIG": {"hosts": [REDIS_URL],
                       "prefix": env_str("CACHE_KEY_PREFIX", "swarm") + ":asgi"},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Latest heartbeat figures live in the cache, shared by the portal and Celery processes:
# Redis in production, files under var/ in the embedded default.
CACHE_KEY_PREFIX = env_str("CACHE_KEY_PREFIX", "swarm")
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                          "LOCATION": REDIS_URL, "KEY_PREFIX": CACHE_KEY_PREFIX}}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                          "LOCATION": str(VAR_DIR / "cache"), "KEY_PREFIX": CACHE_KEY_PREFIX,
                          "OPTIONS": {"MAX_ENTRIES": 100_000}}}

# The inference gateway (/v2): largest request body, and who may read /metrics.
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 64 * 1024**2, minimum=1024)
# Prometheus: a bearer token for /metrics; unset, /metrics answers only with METRICS_PUBLIC=1.
METRICS_TOKEN = env_str("METRICS_TOKEN", "")
METRICS_PUBLIC = env_bool("METRICS_PUBLIC", False)
if not METRICS_TOKEN and not METRICS_PUBLIC:
    import secrets as _secrets

    METRICS_TOKEN = _secrets.token_urlsafe(32)  # closed: nobody knows this one

# Worker agents: heartbeat period, and how many missed heartbeats make a node offline.
HEARTBEAT_INTERVAL_S = env_float("HEARTBEAT_INTERVAL_S", 1.0, minimum=0.1)
MISSED_HEARTBEATS_OFFLINE = env_int("MISSED_HEARTBEATS_OFFLINE", 3, minimum=1)
# The auto-scaler: how often it decides (at most 2 s), and how long the gateway holds a
# request for a deployment at zero replicas while one starts (then 503).
SCALING_TICK_S = env_float("SCALING_TICK_S", 0.5, minimum=0.1)
if SCALING_TICK_S > 2:
    raise ImproperlyConfigured("environment variable SCALING_TICK_S must be at most 2 (seconds)")
GATEWAY_HOLD_TIMEOUT_S = env_float("GATEWAY_HOLD_TIMEOUT_S", 60.0, minimum=0)
# GPU-server providers (scaling/providers/): where the auto-scaler gets nodes from.
SCALING_PROVIDER = env_str("SCALING_PROVIDER", "static")
if SCALING_PROVIDER not in ("static", "local"):
    raise ImproperlyConfigured(
        f"environment variable SCALING_PROVIDER must be static or local, got {SCALING_PROVIDER!r}")
LOCAL_FLEET_MIN_NODES = env_int("LOCAL_FLEET_MIN_NODES", 1, minimum=0)
LOCAL_FLEET_MAX_NODES = env_int("LOCAL_FLEET_MAX_NODES", 3, minimum=LOCAL_FLEET_MIN_NODES)
LOCAL_FLEET_PORTAL_URL = env_str("LOCAL_FLEET_PORTAL_URL", "http://127.0.0.1:8000")
LOCAL_FLEET_BASE_PORT = env_int("LOCAL_FLEET_BASE_PORT", 9100, minimum=1)
NODE_IDLE_RELEASE_S = env_float("NODE_IDLE_RELEASE_S", 60.0, minimum=0.0)
# A tick that waited longer than its period is stale: drop it rather than pile them up.
CELERY_BEAT_SCHEDULE = {
    "sweep-nodes": {"task": "serving.tasks.sweep_nodes", "schedule": HEARTBEAT_INTERVAL_S,
                    "options": {"expires": max(HEARTBEAT_INTERVAL_S, 1.0)}},
    "reconcile-deployments": {"task": "serving.tasks.reconcile_deployments", "schedule": 2.0,
                              "options": {"expires": 2.0}},
    "autoscale": {"task": "scaling.tasks.autoscale_tick", "schedule": SCALING_TICK_S,
                  "options": {"expires": max(SCALING_TICK_S, 1.0)}},
}

# One code path for both modes: Redis in production; embedded, kombu's SQLAlchemy transport
# on a SQLite file (swarm_portal/broker.py: safe across processes, polled every 0.1 s).
# The URL is SQLAlchemy's (no "sqla+"): with that prefix kombu would pick its own class.
CELERY_BROKER_URL = REDIS_URL or f"sqlite:///{VAR_DIR.resolve() / 'celery-broker.sqlite3'}"
if not REDIS_URL:
    CELERY_BROKER_TRANSPORT = "swarm_portal.broker:Transport"
# Without Redis: a writer waits up to 30 s for SQLite's lock instead of failing after 5 s.
CELERY_BROKER_TRANSPORT_OPTIONS = {} if REDIS_URL else {"connect_args": {"timeout": 30}}
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TIMEZONE = "UTC"

# Production hardening; `manage.py check --deploy` is clean with DEBUG off.
SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", not DEBUG)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_SECONDS > 0
SECURE_HSTS_PRELOAD = SECURE_HSTS_SECONDS > 0
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("TRUST_X_FORWARDED_PROTO", False) else None
)
X_FRAME_OPTIONS = "DENY"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "filters": {"retryable_unavailable": {
        "()": "swarm_portal.log_filters.RetryableUnavailable"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.request": {"level": "ERROR", "filters": ["retryable_unavailable"]}},
}
