import os

# The Triton interpreter runs every tl.dot through numpy on tiles of ~64x64,
# where a multi-threaded BLAS only adds overhead (2-3x slower suite on 2 cores).
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

# Without a GPU, Triton kernels are exercised on CPU tensors through the
# interpreter. It must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
