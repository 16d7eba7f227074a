"""Where the Triton kernel tests run: on CUDA; without a GPU, in Triton's interpreter when triton is installed and
TRITON_INTERPRET=1 (float32 cases only: the interpreter truncates float32 to bfloat16 where GPUs round); else
nowhere (skipped)."""

import importlib.util
import os

import pytest
import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
if torch.cuda.is_available():
    DEVICE: str | None = "cuda"
elif HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    DEVICE = None

MARKS = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None or not HAVE_TRITON,
                                             reason="needs CUDA and triton (or TRITON_INTERPRET=1)")]
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="the interpreter truncates float32 to bfloat16; GPUs round to nearest"))]
