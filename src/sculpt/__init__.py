"""sculpt: train, sample and evaluate diffusion models of images.

The contracts (docs/architecture.md in the repository): ``schedules`` map time to noise
level sigma in x = x0 + sigma * eps; a ``Denoiser`` turns any network into
D(x, sigma) -> x0_hat (``DenoiserFn`` is the protocol every sampler takes); a sampler is a
plain function over D and a grid of sigmas (``Guided`` wraps a denoiser in classifier-free
guidance or autoguidance and is one too); an objective (``sculpt.objectives``) is what
the training loop optimises; a run folder (``sculpt.run``) rebuilds itself with ``load``.
"""

from . import schedules
from .denoiser import Denoiser
from .guidance import Guided
from .samplers import SAMPLERS, sample
from .schedules import GRIDS, SCHEDULES
from .tune import tune_grid

__version__ = "0.1.0"

__all__ = ["Denoiser", "GRIDS", "Guided", "SAMPLERS", "SCHEDULES", "sample", "schedules", "tune_grid", "__version__"]
