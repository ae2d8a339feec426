# A gpulane node: `gpulane serve` with the example presets, as a non-root user.
#
#   docker build -t gpulane .
#   docker run --init --gpus all -p 8765:8765 -v gpulane-data:/var/lib/gpulane \
#       -e GPULANE_KEYS="admin:$(openssl rand -hex 24):admin+tasks+leases" gpulane
#
# It listens on 0.0.0.0, and a node on a non-loopback address refuses to start without API
# keys: give GPULANE_KEYS (name:secret:scope+scope,...) or a keys file mounted read-only with
# GPULANE_KEYS_FILE (docs/security.md). No key is baked in here. docs/fleet.md has the image
# and examples/compose.yaml (Redis and two nodes).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/gpulane
# The package alone (no dev or models extras): the example presets that need torch and
# friends are listed but their workers fail to start until a derived image installs them
# (pip install 'gpulane[models]').
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install . && rm -rf src build

COPY examples/presets ./examples/presets

# A fixed uid, so that a volume's or a keys file's owner can be set from outside. The folders
# a volume may be mounted on exist here with their owner: a new named volume takes it.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/gpulane --no-create-home \
        gpulane \
    && mkdir -p /var/lib/gpulane /run/gpulane/gpu-locks /srv/gpulane-files \
    && chown -R gpulane:gpulane /var/lib/gpulane /run/gpulane /srv/gpulane-files

# The NVIDIA container runtime mounts the driver (NVML for the GPU readings) when asked.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    GPULANE_HOST=0.0.0.0 \
    GPULANE_PORT=8765 \
    GPULANE_DATA_DIR=/var/lib/gpulane \
    GPULANE_EXAMPLES_DIR=/opt/gpulane/examples/presets

USER 10001
WORKDIR /var/lib/gpulane
VOLUME ["/var/lib/gpulane"]
EXPOSE 8765

# /readyz: started, not draining, store answering (a draining node reads unhealthy, which is
# what a load balancer should see). urllib raises on a 503, so the exit code says it.
HEALTHCHECK --interval=10s --timeout=4s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('GPULANE_PORT', '8765'), timeout=3)"]

# SIGTERM drains: running work gets drain_grace_s (30 s), so give `docker stop -t 40`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gpulane"]
CMD ["serve", "--host", "0.0.0.0"]
