"""The training loop and what plugs into it.

- :mod:`~medtl.training.trainer`: :class:`Trainer`, the loop over named steps, and its checkpoints.
- :mod:`~medtl.training.state`: :class:`TrainState`, what a run remembers between epochs.
- :mod:`~medtl.training.handlers`: early stopping, keep-best, plateau unfreezing, progress events.
- :mod:`~medtl.training.domains`: the loss of a micro-batch, plain, with DSBN or with DANN.
- :mod:`~medtl.training.backoff`: the memory estimate and the out-of-memory back-off.
- :mod:`~medtl.training.data`: seeded sampling and loading of the training batches.
- :mod:`~medtl.training.setup`: building the network, optimiser, loss and loaders.

Most callers want :func:`medtl.train.fit`, which runs a :class:`Trainer` and returns its result.
"""

from medtl.training.handlers import EarlyStopping, Handler, KeepBest, PlateauUnfreezing, ProgressEvents
from medtl.training.state import TrainState
from medtl.training.trainer import Trainer

__all__ = ["EarlyStopping", "Handler", "KeepBest", "PlateauUnfreezing", "ProgressEvents", "TrainState", "Trainer"]
