# syntax=docker/dockerfile:1
#
# One image for every online-ctr service. Each service is a build target that
# sets the command and a health check:
#
#   docker build --target joiner -t online-ctr/joiner:0.1.0 .
#
# Targets: joiner, trainer, scorer, simulator, topics (the one-shot topic
# job) and cli (the plain `online-ctr` command, the default without
# --target). The Python dependencies are the exact versions in
# constraints.txt, which deploy/freeze_constraints.py writes from the venv
# the tests ran in.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# Build: install the dependencies and the project into a virtual environment.
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# The dependencies change less often than the code, so they get their own layer.
COPY constraints.txt ./
RUN pip install --requirement constraints.txt

COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install --no-deps --constraint constraints.txt '.[serve]' \
    && pip check

# Runtime: the virtual environment on a clean base, run as an unprivileged user.
FROM ${PYTHON_IMAGE} AS runtime

RUN groupadd --system --gid 10001 octr \
    && useradd --system --uid 10001 --gid octr --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin octr

COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    ONLINE_CTR_LOG_FORMAT=json

USER octr:octr
WORKDIR /tmp
ENTRYPOINT ["online-ctr"]

# The health checks fetch a local URL with the standard library: a refused
# connection or an HTTP error status raises, and the exit status 1 marks the
# container unhealthy. Each reads its port from the service's own setting.

FROM runtime AS joiner
EXPOSE 9101
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('ONLINE_CTR_METRICS_PORT', '9101'), timeout=4)"]
CMD ["joiner"]

FROM runtime AS trainer
EXPOSE 9102
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('ONLINE_CTR_METRICS_PORT', '9102'), timeout=4)"]
CMD ["trainer"]

# /healthz, not /readyz: a fresh deployment has no model, so /readyz answers
# 503 until the trainer publishes one, and the container must count as
# running meanwhile. Load balancers should route by /readyz.
FROM runtime AS scorer
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ONLINE_CTR_HTTP_PORT', '8000'), timeout=4)"]
CMD ["scorer"]

FROM runtime AS simulator
EXPOSE 9104
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('ONLINE_CTR_METRICS_PORT', '9104'), timeout=4)"]
CMD ["simulator"]

# A one-shot job: it exits when the topics exist, so there is nothing to check.
FROM runtime AS topics
HEALTHCHECK NONE
CMD ["topics", "create"]

FROM runtime AS cli
CMD ["--help"]
