# The vtuber-letta image (provisioning and the bridge); the Letta server runs from letta/letta.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY vtuber_letta ./vtuber_letta
COPY tools ./tools
COPY agent_templates ./agent_templates
COPY provisioning ./provisioning
COPY bridge ./bridge
COPY stack ./stack
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT []
