# One image for every Bazaar process; the entry point is the `bazaar` command:
#   docker build -t bazaar .
#   docker run --rm bazaar --help
#   docker compose up          (compose.yaml: PostgreSQL, a coordinator, a gateway, two nodes)
# CPU by default. For NVIDIA GPUs build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
# (and add the vllm extra: --build-arg EXTRAS=envs,vllm).
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=envs
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 BAZAAR_HOME=/data

WORKDIR /app
RUN pip install --index-url "$TORCH_INDEX" "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY bazaar bazaar
COPY coordinator coordinator
COPY envs envs
COPY gateway gateway
COPY node node
COPY protocol protocol
COPY verification verification
COPY examples examples
RUN pip install -e ".[$EXTRAS]"

# the data directory: identity key, databases, models, adapters, rollout payloads
VOLUME /data
# coordinator: libp2p 4001, REST 8700; gateway 8800; a node's serving endpoint 8900
EXPOSE 4001 8700 8800 8900
ENTRYPOINT ["bazaar"]
CMD ["--help"]
