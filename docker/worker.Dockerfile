# A CUDA worker: the project and the torch it is tested on, run as a non-root user.
#   docker build -f docker/worker.Dockerfile -t pet-lora-sweeper-worker .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The torch the tests run on (PyPI's Linux wheel of it is the CUDA build).
RUN pip install --no-cache-dir torch==2.13.0

# Ubuntu 24.04 images come with a user 'ubuntu' holding uid 1000.
RUN (userdel --remove ubuntu || true) && useradd --create-home --uid 1000 sweeper
WORKDIR /opt/pet-lora-sweeper
COPY --chown=sweeper:sweeper pyproject.toml README.md ./
COPY --chown=sweeper:sweeper sweeper ./sweeper
COPY --chown=sweeper:sweeper hydra_plugins ./hydra_plugins
COPY --chown=sweeper:sweeper conf ./conf
RUN pip install --no-cache-dir -e ".[gpu,slurm]"

USER sweeper
WORKDIR /home/sweeper/work
ENV PET_LORA_SWEEPER_CACHE=/home/sweeper/work/.cache
ENTRYPOINT ["python", "-m", "sweeper"]
