"""Real data that ships beside the repository (../shared/datasets), wherever the
checkout is: /work/main next to /work/shared here, a CI clone next to its copy."""
import os
from pathlib import Path

SHARED = Path(os.environ.get("BATCHLAB_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MNIST_T10K = SHARED / "datasets" / "mnist-t10k"
