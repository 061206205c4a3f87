# tqindex REST service. CPU torch by default; for CUDA:
#   docker build --build-arg TORCH_VARIANT=cu128 -t tqindex:cuda .   and run with --gpus all
# Run: docker run -p 6333:6333 -v tqdata:/data tqindex [--api-key KEY]
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# torch wheel index variant: "cpu" (default) or a CUDA tag published for TORCH_VERSION (cu126, cu128, ...)
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first, from its own index, so that the package install below finds it satisfied and never
# pulls the multi-GB default CUDA build from PyPI. CUDA wheels bring triton and the CUDA runtime.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"

COPY pyproject.toml README.md constraints.txt ./
COPY tqindex ./tqindex
COPY server ./server
# The project itself from this directory, every dependency pinned by constraints.txt (what CI tested);
# a CUDA torch brings the triton it was built with, so that one pin is dropped there.
RUN if [ "${TORCH_VARIANT}" != "cpu" ]; then sed -i '/^triton==/d' constraints.txt; fi \
    && pip install --no-cache-dir -c constraints.txt ".[server]" \
    && useradd --system --uid 10001 --no-create-home --home-dir /data tqindex \
    && mkdir -p /data \
    && chown tqindex /data

USER 10001
VOLUME ["/data"]
EXPOSE 6333

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:6333/healthz', timeout=4)"]

# Extra arguments (e.g. --api-key KEY) are appended to the command; TQINDEX_API_KEY works too.
ENTRYPOINT ["tqindex", "serve", "--host", "0.0.0.0", "--port", "6333", "--data-dir", "/data"]
