# One image for every sdmesh service: `docker run IMAGE serve encoder|denoiser|decoder|gateway …`.
# It installs the serve extra (JAX, no torch). For NVIDIA GPUs build with
#   --build-arg JAX_PACKAGE='jax[cuda12]'
FROM python:3.11-slim

ARG JAX_PACKAGE=jax
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Models: a diffusers folder under /models, or a Hub id cached there (HF_HOME), shared by the services.
    HF_HOME=/models/hf \
    # Several JAX processes may share one accelerator: none takes most of its memory up front.
    XLA_PYTHON_CLIENT_PREALLOCATE=false

WORKDIR /opt/sdmesh
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY services ./services
COPY client ./client
RUN pip install "${JAX_PACKAGE}" ".[serve]"

RUN useradd --create-home --uid 1000 sdmesh && mkdir -p /models /cache /certs && chown sdmesh /models /cache /certs
USER sdmesh
VOLUME ["/models", "/cache", "/certs"]
EXPOSE 50051 50052 50053 50054

ENTRYPOINT ["sdmesh"]
CMD ["serve", "gateway", "--host", "0.0.0.0"]
