# SwitchT5 in a container: the environment of scripts/setup.sh (Debian 12, the same Debian
# packages, installed by setup.sh itself) plus CUDA 13 from NVIDIA's Debian 12 repository, with
# the CUDA backend and the NCCL data plane built for sm_90 (Hopper).
#   docker build -t switcht5 .                        # CUDA build (needs no GPU to build)
#   docker build -t switcht5-cpu --build-arg CUDA=0 . # CPU only, no NVIDIA packages
# Run (README, "Containers"): docker run --gpus all --ipc=host switcht5 ... ; Apptainer:
#   apptainer build switcht5.sif docker-daemon://switcht5:latest && apptainer exec --nv ...
# Debian, not an nvidia/cuda image (Ubuntu or RHEL): setup.sh and the CI's fresh-machine check
# target Debian 12, so the container is the tested environment plus NVIDIA's toolkit, which the
# fresh-machine check cannot install (a separate vendor install, as on the GPU hosts).
FROM debian:12
ARG CUDA=1
ARG CUDA_ARCHS=90
ENV DEBIAN_FRONTEND=noninteractive
WORKDIR /src
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends ca-certificates wget \
 && if [ "$CUDA" = 1 ]; then \
      wget -q https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb \
      && dpkg -i cuda-keyring_1.1-1_all.deb && rm cuda-keyring_1.1-1_all.deb \
      && apt-get update -qq \
      && apt-get install -y -qq --no-install-recommends cuda-toolkit-13-0 libnccl2 libnccl-dev; \
    fi \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/local/cuda/bin:$PATH
COPY . .
# The Debian packages come from setup.sh alone (tests/test_dockerfile.sh checks that no list is
# copied here); it builds build/switcht5 and build/switcht5-data.
RUN apt-get update -qq \
 && if [ "$CUDA" = 1 ]; then \
      export SWITCHT5_CMAKE_ARGS="-DSWITCHT5_CUDA=ON -DSWITCHT5_NCCL=ON -DSWITCHT5_CUDA_ARCHS=$CUDA_ARCHS"; \
    fi \
 && SWITCHT5_SKIP_RUN=1 bash scripts/setup.sh \
 && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["/src/build/switcht5"]
CMD ["--help"]
