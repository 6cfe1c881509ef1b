# batchlab: workers, the CLI and the dashboard in one image (CPU PyTorch by default).
#
#   docker build -t batchlab .
#   docker run --rm batchlab                       # = batchlab --help
#
# GPU image: the same file with CUDA wheels of PyTorch (they bundle the CUDA libraries;
# the host needs only the NVIDIA driver and the NVIDIA container toolkit):
#   docker build -t batchlab:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
#
# Many workers, many machines, one PostgreSQL. Put the URL (it holds a password) in an
# env file rather than on the command line, so it stays out of shell history and `ps`:
#   echo 'BATCHLAB_STORAGE=postgresql+psycopg://batchlab:SECRET@db.example.org:5432/batchlab' > batchlab.env
#   docker run --rm --env-file batchlab.env batchlab campaign create examples/demo_digits.toml
#   docker run -d --env-file batchlab.env --gpus '"device=0"' batchlab:cuda worker --campaign NAME --device cuda
#   docker run -d --env-file batchlab.env --gpus '"device=1"' batchlab:cuda worker --campaign NAME --device cuda
#   (one worker per GPU; start as many as you like, on any machine that reaches the database)
#
# Dashboard (port 8501). Inside a container it must bind to 0.0.0.0 to be reachable at
# all; publish it on the host's loopback only, because the app has no login (to share it,
# put it behind an authenticating reverse proxy instead of publishing 0.0.0.0):
#   docker run -d --env-file batchlab.env -p 127.0.0.1:8501:8501 batchlab dashboard --address 0.0.0.0 --port 8501
#
# Embedded SQLite instead of PostgreSQL (one machine): keep the file on a volume.
#   docker run --rm -v "$PWD/out:/data" batchlab run examples/demo_digits.toml --storage sqlite:////data/demo.db --workers 2
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# PyTorch first, in its own layer: it is by far the largest and changes least. The CPU
# index keeps the default image free of gigabytes of CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" torch torchvision

WORKDIR /app
COPY pyproject.toml README.md ./
COPY study ./study
COPY trainers ./trainers
COPY db ./db
COPY app ./app
COPY examples ./examples
# The postgres extra is psycopg[binary]: it bundles libpq, so no system packages needed.
RUN pip install ".[postgres]" && rm -rf build ./*.egg-info

# Run as a normal user; /data is where SQLite files and exported figures go.
RUN useradd --create-home --uid 1000 batchlab && mkdir /data && chown batchlab:batchlab /data
USER batchlab

EXPOSE 8501
ENTRYPOINT ["batchlab"]
CMD ["--help"]
