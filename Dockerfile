# One image for every klines service. The command picks the service:
#
#   docker run --rm klines:dev                                   # prints `klines --help`
#   docker run --rm klines:dev python -m services.aggregator     # compose and Kubernetes set `command:` like this
#
# Build:  docker build -t klines:dev .            (add --build-arg WITH_CHDB=true for the embedded engine)
#
# Containers talk to a ClickHouse server (CLICKHOUSE_DSN=http://clickhouse:8123), so by default the image leaves
# out the embedded engine: the `embedded` extra of pyproject.toml (chdb, with pyarrow, pandas and numpy: about
# 0.8 GB of the 1 GB a full install weighs). A service given a chdb: DSN in this image says so in one line.
# Every dependency is pyproject.toml's list (plus the extra with WITH_CHDB=true), pinned by constraints.txt.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: a virtual environment in /opt/klines with the pinned dependencies and the project -----------------
FROM ${PYTHON_IMAGE} AS build

ARG WITH_CHDB=false
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/klines
ENV PATH=/opt/klines/bin:$PATH
WORKDIR /app

# Dependencies first: this layer is rebuilt only when pyproject.toml or constraints.txt change.
COPY pyproject.toml constraints.txt README.md ./
RUN python -c 'import sys, tomllib; \
project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
extra = project["optional-dependencies"]["embedded"] if sys.argv[1] == "true" else []; \
print("\n".join(project["dependencies"] + extra))' \
        "$WITH_CHDB" > /tmp/requirements.txt \
    && cat /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt

COPY services ./services
COPY deploy/clickhouse ./deploy/clickhouse
COPY config/klines.toml ./config/klines.toml
# Editable on purpose: the code finds the versioned DDL beside the source tree (deploy/clickhouse, see
# services/shared/clickhouse.py), so the package stays at /app and the venv points at it. No dependency is
# resolved here (--no-deps): they are all installed above, at the pinned versions.
RUN pip install --no-deps -e . \
    && python -m compileall -q services \
    && rm -rf build *.egg-info

# --- runtime: the venv and the source tree, run as an unprivileged user ----------------------------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="klines" \
      org.opencontainers.image.description="Binance-exact klines from aggTrade streams: Kafka microservices into ClickHouse"

RUN groupadd --system --gid 10001 klines \
    && useradd --system --uid 10001 --gid klines --home-dir /var/lib/klines --no-create-home \
        --shell /usr/sbin/nologin klines \
    && mkdir -p /var/lib/klines \
    && chown klines:klines /var/lib/klines

COPY --from=build /opt/klines /opt/klines
COPY --from=build /app /app

# The working directory is the writable state directory (a volume in compose, an emptyDir in Kubernetes): the
# code itself stays read-only, and anything a library writes relative to the working directory lands here.
ENV PATH=/opt/klines/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KLINES_CONFIG=/app/config/klines.toml \
    KLINES_SERVICE__STATE_DIR=/var/lib/klines
WORKDIR /var/lib/klines
USER 10001:10001

# ingest 8080, aggregator 8081, writers 8082 (config/klines.toml); the replay exchange's port is its --port.
EXPOSE 8080 8081 8082

CMD ["klines", "--help"]
