"""Test-suite settings.

One intra-op thread: the suite's tensors are small, and on a busy 2-core machine two
threads per op thrash (a 20x slowdown measured on the Gaussian-mixture denoiser).
"""

import torch

torch.set_num_threads(1)
