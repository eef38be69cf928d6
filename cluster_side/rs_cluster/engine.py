"""The distributed-training engine interface: what the train stage needs from Horovod (or another).

A stage never calls Horovod itself. It asks an engine to launch N copies of a worker function
(in-process for one, as Spark tasks for more) and, inside each worker, to initialise, tell rank and
world size, wrap the optimizer, supply the callbacks that keep workers in step, and broadcast small
Python objects. :mod:`rs_cluster.engine_horovod` implements it with Horovod; a
``tf.distribute.MultiWorkerMirroredStrategy`` engine launched in Spark barrier mode would implement
the same methods (its :meth:`Engine.scope` being the strategy's scope).
"""

from __future__ import annotations

import importlib
from typing import IO, Any, Callable, ContextManager, Protocol, Sequence

from rs_cluster.errors import ConfigError

ENGINES = {"horovod": "rs_cluster.engine_horovod:HorovodEngine"}
DEFAULT_ENGINE = "horovod"


class Engine(Protocol):
    name: str

    # -- driver side --------------------------------------------------------------------------------
    def launch(self, fn: Callable[..., Any], args: Sequence[Any], *, num_proc: int,
               nics: list[str] | None = None, env: dict[str, str] | None = None,
               start_timeout: int = 120, output: IO[str] | None = None) -> list[Any]:
        """Runs ``fn(*args)`` in ``num_proc`` workers; returns their results in rank order.

        One worker runs in this process; more run as tasks of the active SparkContext.
        """

    def lost_worker(self, error: BaseException, output: Sequence[str] = ()) -> str | None:
        """What killed a worker, when ``launch`` failed because one was killed by a signal (worth
        restarting from a checkpoint); None when the workers failed in any other way.
        ``output``: the workers' output lines, which may say it when the error does not."""

    # -- worker side --------------------------------------------------------------------------------
    def init(self, threads: int | None = None) -> str:
        """Joins the worker group, pins a device, sets CPU threads; returns the device used."""

    def rank(self) -> int: ...

    def size(self) -> int: ...

    def scope(self) -> ContextManager[Any]:
        """Context in which the model and optimizer are built."""

    def wrap_optimizer(self, optimizer: Any) -> Any:
        """The optimizer that combines gradients over all workers."""

    def callbacks(self, *, initial_lr: float, warmup_epochs: int, steps_per_epoch: int) -> list[Any]:
        """Keras callbacks that sync initial weights, warm the LR up and average epoch metrics.

        They must come before any callback that reads the epoch's metrics.
        """

    def broadcast_object(self, obj: Any) -> Any:
        """``obj`` as rank 0 has it, on every worker."""


def get_engine(name: str = DEFAULT_ENGINE) -> Engine:
    try:
        module, cls = ENGINES[name].split(":")
    except KeyError:
        raise ConfigError(f"unknown training engine {name!r}; known: {', '.join(ENGINES)}") from None
    return getattr(importlib.import_module(module), cls)()
