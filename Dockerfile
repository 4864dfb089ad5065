# The vtuber-letta image: the one-shot `provision`, the `bridge`, the memory gate and the console of
# docker-compose.yml. The Letta
# server itself runs from the letta/letta:0.16.8 image. Python as pyproject.toml's requires-python.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
# Every package of pyproject.toml's [tool.setuptools.packages.find] (checked in CI).
COPY vtuber_letta ./vtuber_letta
COPY tools ./tools
COPY agent_templates ./agent_templates
COPY provisioning ./provisioning
COPY bridge ./bridge
COPY stack ./stack
COPY console ./console
RUN pip install --no-cache-dir . \
    && mkdir -p /app/data/config /app/data/uploads
# The persona the agents get when no data/config/persona.yaml is mounted.
COPY data/config/persona.sample.yaml ./data/config/persona.sample.yaml
ENV VTL_PERSONA_CONFIG=/app/data/config/persona.yaml
USER nobody
ENTRYPOINT []
CMD ["vtuber-letta", "bridge"]
