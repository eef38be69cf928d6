"""The Horovod engine (see :mod:`rs_cluster.engine`): every Horovod call of the project is here.

Workers run with Gloo as Spark tasks (``horovod.spark.run``), one process each; a single worker runs
in the calling process, where ``hvd.init()`` makes a world of one, so both cases run the same code.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from typing import IO, Any, Callable, ContextManager, Sequence


class HorovodEngine:
    name = "horovod"

    # -- driver side --------------------------------------------------------------------------------
    def launch(self, fn: Callable[..., Any], args: Sequence[Any], *, num_proc: int,
               nics: list[str] | None = None, env: dict[str, str] | None = None,
               start_timeout: int = 120, output: IO[str] | None = None) -> list[Any]:
        if num_proc == 1:
            return [fn(*args)]
        import horovod.spark

        # Horovod: workers out of step this long (one lost, or waiting on a collective the others
        # never reach) shut down with an error instead of waiting for ever.
        env = {**(env if env is not None else os.environ)}
        env.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", "600")
        # Horovod: one Spark task per worker; Gloo rendezvous through the driver on `nics`.
        return horovod.spark.run(fn, args=tuple(args), num_proc=num_proc, start_timeout=start_timeout,
                                 use_gloo=True, env=env, stdout=output, stderr=output, verbose=0,
                                 nics=nics)

    @staticmethod
    def lost_worker(error: BaseException, output: Sequence[str] = ()) -> str | None:
        # Horovod names the first worker to exit non-zero and its exit code: a shell's 128+N or
        # -N for signal N. The others then fail with "Horovod has been shut down" (exit code 1).
        # Which one Horovod sees first is a race: a survivor whose peer's socket closed may exit
        # (code 1) before the killed worker is reaped. The killed worker's shell said so in its
        # output then ("[1]<stderr>:Killed"), and that is read too.
        match = re.search(r"Process name: (\S+)\s+Exit code: (-?\d+)", str(error))
        if match is None and "processes exited with non-zero status" not in str(error):
            return None
        code = int(match.group(2)) if match else 0
        signum = -code if code < 0 else code - 128 if code > 128 else 0
        if not signum:
            return _killed_in_output(output)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"training worker {match.group(1)} was killed ({name})"

    # -- worker side --------------------------------------------------------------------------------
    def init(self, threads: int | None = None) -> str:
        import horovod.tensorflow.keras as hvd
        import tensorflow as tf

        hvd.init()  # Horovod: join the workers (a world of one when not launched by Horovod)
        # Horovod: the host's cores are shared by its local workers; more threads only thrash.
        threads = threads or max(1, (os.cpu_count() or 1) // hvd.local_size())
        with contextlib.suppress(RuntimeError):  # TF already running in this process: keep its pools
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return f"CPU ({threads} thread(s))"
        gpu = gpus[hvd.local_rank() % len(gpus)]  # Horovod: one GPU per process, by local rank
        with contextlib.suppress(RuntimeError):
            tf.config.set_visible_devices(gpu, "GPU")
            tf.config.experimental.set_memory_growth(gpu, True)
        return f"GPU {gpu.name}"

    def rank(self) -> int:
        import horovod.tensorflow.keras as hvd

        return hvd.rank()  # Horovod: this worker's index

    def size(self) -> int:
        import horovod.tensorflow.keras as hvd

        return hvd.size()  # Horovod: number of workers

    def scope(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def wrap_optimizer(self, optimizer: Any) -> Any:
        import horovod.tensorflow.keras as hvd

        return hvd.DistributedOptimizer(optimizer)  # Horovod: allreduce-average the gradients

    def callbacks(self, *, initial_lr: float, warmup_epochs: int, steps_per_epoch: int) -> list[Any]:
        import horovod.tensorflow.keras as hvd

        callbacks = [
            # Horovod: every worker starts from rank 0's variables (fresh or restored from a checkpoint).
            hvd.callbacks.BroadcastGlobalVariablesCallback(0),
            # Horovod: epoch metrics (and validation metrics) averaged over the workers.
            hvd.callbacks.MetricAverageCallback(),
        ]
        if hvd.size() > 1 and warmup_epochs > 0:
            # Horovod: ramp the size-scaled LR up from the single-worker LR (Goyal et al. 2017).
            callbacks.append(hvd.callbacks.LearningRateWarmupCallback(
                initial_lr=initial_lr, warmup_epochs=warmup_epochs, steps_per_epoch=steps_per_epoch,
                verbose=0))
        return callbacks

    def broadcast_object(self, obj: Any) -> Any:
        import horovod.tensorflow as hvd_tf

        return hvd_tf.broadcast_object(obj, root_rank=0)  # Horovod: rank 0's value everywhere


# What a worker's shell prints when its process dies of SIGKILL or SIGTERM; Horovod prefixes each
# line of a worker's stderr with its rank.
_SHELL_DEATH = re.compile(r"^\[(\d+)\]<stderr>:(Killed|Terminated)\s*$")


def _killed_in_output(lines: Sequence[str]) -> str | None:
    for line in lines:
        found = _SHELL_DEATH.match(line.strip())
        if found:
            name = "SIGKILL" if found.group(2) == "Killed" else "SIGTERM"
            return f"training worker {found.group(1)} was killed ({name})"
    return None
