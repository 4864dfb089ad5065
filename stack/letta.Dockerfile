# The Letta server 0.16.8 (== stack/install.py LETTA_VERSION, checked in CI) with vtuber-letta's slim
# tool sandbox: the same stack/tool_sandbox.py the local stack runs builds a venv with nothing but
# the standard library, whose python3 keeps only the variables our tools read and runs them as the
# unprivileged user vtl-tools (docs/RELIABILITY.md, "The tool sandbox").
FROM letta/letta:0.16.8
COPY stack/tool_sandbox.py /opt/vtuber-letta/tool_sandbox.py
RUN python3 /opt/vtuber-letta/tool_sandbox.py /opt/vtl-tool-sandbox --user vtl-tools
# TOOL_EXEC_AUTORELOAD_VENV stays false: on, every boot would delete the venv and run pip.
ENV TOOL_EXEC_DIR=/opt/vtl-tool-sandbox \
    TOOL_EXEC_VENV_NAME=venv \
    TOOL_EXEC_AUTORELOAD_VENV=false
