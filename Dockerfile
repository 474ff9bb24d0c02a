# pilotlab service image: one image, the CLI picks the role, e.g.
#   docker run --rm pilotlab:local run ingest
# docker-compose.yml builds it as pilotlab:local for migrate, topics, ingest, streams, sink.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# The source stays in the image (read-only for the service user) so that example
# manifests under control/examples/ can be used from inside the container.
WORKDIR /opt/pilotlab
COPY . .
RUN pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info

# Run as an unprivileged user; /var/lib/pilotlab is its writable working directory
# (relative data paths such as .pilotlab/streams end up there).
RUN useradd --system --create-home --uid 10001 --user-group --shell /usr/sbin/nologin pilotlab \
    && mkdir -p /var/lib/pilotlab \
    && chown pilotlab:pilotlab /var/lib/pilotlab
USER pilotlab
WORKDIR /var/lib/pilotlab

ENTRYPOINT ["pilotlab"]
CMD ["--help"]
