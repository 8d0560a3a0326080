# A CUDA worker: the project on PyTorch's CUDA image, run as a non-root user.
#   docker build -f docker/worker.Dockerfile -t pet-lora-sweeper-worker .
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

RUN useradd --create-home --uid 1000 sweeper
WORKDIR /opt/pet-lora-sweeper
COPY --chown=sweeper:sweeper pyproject.toml README.md ./
COPY --chown=sweeper:sweeper sweeper ./sweeper
COPY --chown=sweeper:sweeper hydra_plugins ./hydra_plugins
COPY --chown=sweeper:sweeper conf ./conf
# torch comes with the image (CUDA build); the range in pyproject.toml accepts it.
RUN pip install --no-cache-dir -e ".[gpu,slurm]"

USER sweeper
WORKDIR /home/sweeper/work
ENV PET_LORA_SWEEPER_CACHE=/home/sweeper/work/.cache
ENTRYPOINT ["python", "-m", "sweeper"]
