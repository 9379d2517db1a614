# esprelay: SMTP in, ESP HTTPS API out.
#   docker compose up -d --build    # docker-compose.yml: who may send, ports, stop grace
# or by hand:
#   docker build -t esprelay .
#   docker run --env-file .env -p 127.0.0.1:2525:2525 -p 127.0.0.1:8025:8025
#     --stop-timeout 75 -v esprelay-data:/var/lib/esprelay esprelay        (one line)
# (then clients need AUTH or ESPRELAY_TRUSTED_NETWORKS: README, "Deploying").
#
# The base image is a build argument: any image with Python 3.11+ (its venv module),
# groupadd/useradd and CA certificates will do, such as Debian bookworm with python3,
# python3-venv and ca-certificates (tests/test_container.py builds one with debootstrap):
#   docker build --build-arg BASE_IMAGE=localhost/debian-python:bookworm -t esprelay .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, unprivileged user; the spool volume belongs to it.
RUN groupadd --system --gid 10001 esprelay \
 && useradd --system --uid 10001 --gid esprelay --home-dir /var/lib/esprelay --no-create-home \
      --shell /usr/sbin/nologin esprelay \
 && mkdir -p /var/lib/esprelay \
 && chown esprelay:esprelay /var/lib/esprelay

WORKDIR /opt/esprelay-src
COPY pyproject.toml README.md ./
COPY src ./src
# The same install steps as the Makefile's setup (tests/test_ops_deploy.py checks),
# into a venv of its own, without the editable flag and the dev tools.
RUN python3 -m venv /opt/esprelay \
 && /opt/esprelay/bin/python -m pip install --quiet --upgrade pip \
 && /opt/esprelay/bin/python -m pip install --quiet .

ENV PATH=/opt/esprelay/bin:$PATH \
    ESPRELAY_SMTP_HOST=0.0.0.0 \
    ESPRELAY_SMTP_PORT=2525 \
    ESPRELAY_HTTP_HOST=0.0.0.0 \
    ESPRELAY_HTTP_PORT=8025 \
    ESPRELAY_SPOOL_URL=sqlite:////var/lib/esprelay/spool.db \
    ESPRELAY_OUTBOX_DIR=/var/lib/esprelay/outbox

USER esprelay:esprelay
WORKDIR /var/lib/esprelay
VOLUME ["/var/lib/esprelay"]
# SMTP and the ops HTTP port (health, metrics, admin API). Add ESPRELAY_SMTPS_PORT here
# and in your port mappings when you configure implicit TLS: nothing listens on it otherwise.
EXPOSE 2525 8025

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ESPRELAY_HTTP_PORT', '8025'), timeout=4)"]

# Exec form: esprelay is PID 1 and receives SIGTERM itself (graceful drain) and SIGHUP (reload).
ENTRYPOINT ["/opt/esprelay/bin/esprelay"]
CMD ["serve"]
