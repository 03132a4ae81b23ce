# FETUS 2026 inference container.
#
#   docker build -t fetuskit .
#   docker run --rm --gpus all --network none -u "$(id -u):$(id -g)" \
#       -v INPUT:/ws/data:ro -v OUTPUT:/ws/output fetuskit
#
# The container runs `python /opt/fetuskit/process.py` in /ws with no arguments: it reads
# ./data/valid.json (or the .h5 files in ./data) and writes ./output/<basename>.h5. It works as
# any UID:GID because it writes only to /ws/output and /tmp.

# The base image's torch must match the torch pin in requirements.txt, so pip installs no
# second copy. The official runtime images ship Python 3.11, which the pins are tested with.
# NOTE: this tag was chosen from the official naming scheme and not pulled here (no Docker engine).
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    TORCH_HOME=/tmp/cache/torch \
    HF_HOME=/tmp/cache/huggingface \
    MPLCONFIGDIR=/tmp/cache/matplotlib \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

COPY requirements.txt /opt/fetuskit/requirements.txt
RUN python -m pip install --no-cache-dir -r /opt/fetuskit/requirements.txt

COPY fetuskit/ /opt/fetuskit/fetuskit/
COPY evaluation/ /opt/fetuskit/evaluation/
COPY process.py /opt/fetuskit/process.py
COPY model_weights/ /opt/fetuskit/model_weights/

# /ws/output is created world-writable so that a run without an output mount still works as
# any user. A mounted folder replaces it.
RUN mkdir -p /ws/output \
    && chmod 0777 /ws/output \
    && chmod -R a+rX /opt/fetuskit

WORKDIR /ws
CMD ["python", "/opt/fetuskit/process.py"]
