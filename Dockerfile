# megatron-gpt for GPU clusters: README.md, section "Docker".
# The default base is NGC PyTorch (CUDA, torch, apex, transformer-engine, flash-attn); its torch is
# kept. CI builds this same file on a local Debian base with a CPU torch wheel (tests/test_docker.py).
# Layers go from what changes least to what changes most: a code change rebuilds only the last two.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
ARG USER_NAME=megatron
ARG USER_UID=1000
# setup.py extras to install; "gpu" (flash-attn) is left to the base image.
ARG EXTRAS=data,hf,logging,eval,mpi
# A CA bundle mounted into the build where TLS is intercepted (build-time only; pip ignores "").
ARG PIP_CERT=""

FROM ${BASE_IMAGE} AS system

LABEL org.opencontainers.image.title="megatron-gpt" \
      org.opencontainers.image.description="Distributed GPT training: DeepSpeed + megatron-core, pdsh/MPI/SLURM"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive

# System packages. Open MPI only where the base has no MPI (NGC ships HPC-X: a second mpirun would
# shadow it). g++, python3-dev and ninja: DeepSpeed JIT-builds its ops on first use. Versions come
# from the base's distribution, so they are not pinned here.
# hadolint ignore=DL3008,SC2086
RUN mpi="openmpi-bin libopenmpi-dev"; if command -v mpirun >/dev/null; then mpi=""; fi; \
    apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-dev python3-venv g++ \
       ninja-build openssh-client openssh-server pdsh procps iproute2 $mpi \
    && rm -rf /var/lib/apt/lists/*

# A non-root user (NGC's Ubuntu already has uid 1000: "ubuntu", replaced). /run/sshd: sshd wants it.
ARG USER_NAME
ARG USER_UID
RUN if getent passwd "$USER_UID" >/dev/null; then userdel --remove "$(getent passwd "$USER_UID" | cut -d: -f1)"; fi; \
    useradd --create-home --shell /bin/bash --uid "$USER_UID" "$USER_NAME" \
    && mkdir -p /run/sshd

# A virtualenv that sees the base's packages (NGC's torch, apex, transformer-engine, flash-attn) and
# keeps pip off the system Python (PEP 668 on Debian/Ubuntu). torch: the base's is kept; a base
# without one gets TORCH_SPEC, from TORCH_FIND_LINKS (a wheel folder mounted into the build: the CPU
# wheel in CI, instead of PyPI's multi-GB CUDA build) when given. constraints.txt pins that torch for
# every later install, so no dependency can replace it.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
ARG TORCH_SPEC=torch
ARG TORCH_FIND_LINKS=""
ARG PIP_CERT
# hadolint ignore=DL3013
RUN python3 -m venv --system-site-packages /opt/venv \
    && pip install --no-cache-dir --upgrade pip "setuptools>=68" wheel \
    && if python -c "import torch" 2>/dev/null; then echo "keeping the base image's torch"; \
       else pip install --no-cache-dir ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} "$TORCH_SPEC"; fi \
    && python -c "import torch; print(f'torch=={torch.__version__}')" | tee /opt/venv/constraints.txt

# The requirement list, read from setup.py (not run) in a side stage: the install below is keyed on
# the list's content alone, so edits to the code, README.md or setup.py's test extra keep it.
FROM system AS requirements
ARG EXTRAS
COPY setup.py docker/requirements.py /tmp/deps/
RUN python /tmp/deps/requirements.py /tmp/deps/setup.py "$EXTRAS" > /tmp/deps/requirements.txt

FROM system
ARG USER_UID
ARG PIP_CERT
COPY --from=requirements /tmp/deps/requirements.txt /opt/venv/requirements.txt
RUN pip install --no-cache-dir -c /opt/venv/constraints.txt -r /opt/venv/requirements.txt

# On a CPU-only torch, build DeepSpeed's shared-memory comm op now (0.5-2 min on 2 cores that every
# container would otherwise spend on its first start); it lands in the user's ~/.cache/torch_extensions.
USER ${USER_UID}
RUN if python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
      DS_ACCELERATOR=cpu python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"; \
    fi
USER 0

# sshd for pdsh between containers (run as the user, port 2222; keys come at run time, never from
# the image), the ssh client settings for the cluster network, and the entrypoint.
COPY docker/sshd_config /etc/megatron-gpt/sshd_config
COPY docker/ssh_config /etc/ssh/ssh_config.d/megatron-gpt.conf
COPY docker/entrypoint.sh /usr/local/bin/megatron-gpt-entrypoint

# The code, last. Editable, so configs/, launch/ and tools/ stay beside it and a checkout mounted
# over /opt/megatron-gpt runs instead of the copied one. /ssh and runs/ exist, owned by the user, so
# that empty named volumes mounted there (docker/compose.yml) take that owner.
COPY --chown=${USER_UID} . /opt/megatron-gpt
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e /opt/megatron-gpt \
    && install -d -o "$USER_UID" -m 700 /ssh && install -d -o "$USER_UID" /opt/megatron-gpt/runs \
    && megatron-gpt --help >/dev/null

USER ${USER_UID}
WORKDIR /opt/megatron-gpt
ENTRYPOINT ["/usr/local/bin/megatron-gpt-entrypoint"]
CMD ["--help"]
