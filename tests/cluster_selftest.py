"""A test-only ``rs-cluster``: the real one plus the ``sleep`` self-test stage.

The stage only waits and reports progress (optionally starting child processes, warning, failing,
writing an output, reporting a finish as the train stage does, or cancelling its own job at the
end), so jobs, progress and cancel are exercised in seconds. It is no part of the production
whitelist on either side: this module adds it.

- As a program, ``python -m tests.cluster_selftest ...`` is ``rs-cluster`` with the stage added.
  It passes its own name to the CLI as the entry module, so the job runners it starts, and their
  steps, run this module too: the stage reaches them by the command that started them, not by an
  environment variable a production ``rs-cluster`` would have to honour. :func:`command` is the
  argument list that runs it from anywhere (the plugin tests' ``remote_command``).
- ``--as-host NAME`` before the command makes it run as another login host sharing the
  workspace: a host of that name with a boot id of its own, so a job's runner pid means nothing
  to it (issue 17's round-robin login nodes). Only this entry point knows the option.
- In a test process, :func:`install` adds the stage to the cluster's whitelist for one test, for
  tests that call :func:`rs_cluster.jobs.submit` themselves; :func:`plugin_sleep_spec` builds a
  plugin :class:`JobSpec` with a sleep step.

Nothing here imports rs_cluster or the plugin at module level: the QGIS venv imports it too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
CLUSTER_PYTHON = REPO / ".venv" / "bin" / "python"
ENTRY_MODULE = "tests.cluster_selftest"
STAGE, COMMAND = "sleep", "selftest-sleep"
# parameter -> kind, as both sides' whitelists spell them (rs_cluster.jobspec, core/jobspec.py)
SLEEP_PARAMS = {"seconds": "float", "steps": "int", "children": "int", "fail": "flag",
                "output": "path", "cancel_after": "flag", "warnings": "int", "train_finish": "str"}


def pythonpath() -> str:
    """PYTHONPATH under which this module and rs_cluster import from the source tree."""
    parts = [str(REPO / "cluster_side"), str(REPO)]
    inherited = os.environ.get("PYTHONPATH")
    return os.pathsep.join(parts + ([inherited] if inherited else []))


def command(python: str | os.PathLike[str] = CLUSTER_PYTHON) -> list[str]:
    """The argument list that runs this entry point, whatever the working folder."""
    return ["/usr/bin/env", f"PYTHONPATH={REPO / 'cluster_side'}{os.pathsep}{REPO}", str(python),
            "-m", ENTRY_MODULE]


def sleep_stage() -> tuple[str, Any]:
    """The stage's entry in :data:`rs_cluster.jobspec.STAGES`."""
    from types import MappingProxyType

    from rs_cluster.jobspec import ParamRule

    return COMMAND, MappingProxyType({name: ParamRule("--" + name.replace("_", "-"), kind)
                                      for name, kind in SLEEP_PARAMS.items()})


def _with_sleep(stages: Any) -> Any:
    from types import MappingProxyType

    return MappingProxyType({**stages, STAGE: sleep_stage()})


def install(monkeypatch: Any) -> str:
    """Lets this test process submit sleep jobs until the test ends: the stage joins the cluster's
    whitelist here, and the runner will find this module. Returns the entry module to pass to
    :func:`rs_cluster.jobs.submit`."""
    from rs_cluster import jobspec

    monkeypatch.setattr(jobspec, "STAGES", _with_sleep(jobspec.STAGES))
    monkeypatch.setenv("PYTHONPATH", pythonpath())
    return ENTRY_MODULE


def plugin_sleep_spec(name: str, **params: Any) -> Any:
    """A plugin job spec of one sleep step (the plugin's whitelist lacks the stage too)."""
    from rs_qgis_plugin.core import jobspec

    with mock.patch.dict(jobspec.STAGE_PARAMS, {STAGE: SLEEP_PARAMS}):
        return jobspec.JobSpecBuilder(name).step(STAGE, **params).build()


# -- the stage --------------------------------------------------------------------------------------

def register(subparsers: Any) -> None:
    sleep = subparsers.add_parser(COMMAND, help="test-only stage: waits and reports progress")
    sleep.add_argument("--seconds", type=float, default=1.0)
    sleep.add_argument("--steps", type=int, default=10)
    sleep.add_argument("--children", type=int, default=0,
                       help="also start N idle child processes, every other one in its own "
                       "session, as Spark JVMs and Horovod workers do")
    sleep.add_argument("--fail", action="store_true", help="fail at the end")
    sleep.add_argument("--output", metavar="FILE", help="write a small result file, as stages do")
    sleep.add_argument("--warnings", type=int, default=0, metavar="N",
                       help="report N warning events along the way")
    sleep.add_argument("--train-finish", metavar="JSON",
                       help="at the end, also report a start and a finish event of the stage "
                       "\"train\", the finish carrying the fields of this JSON object (the train "
                       "stage's best_val_iou, best_epoch, verdict, ...; of any type, as a faulty or "
                       "hostile stage might write them)")
    sleep.add_argument("--cancel-after", action="store_true",
                       help="after the last progress event, cancel the own job as `rs-cluster job "
                       "cancel` does (its marker file, then SIGTERM to the runner) and exit 0: a "
                       "cancel that arrives while the job's last stage is exiting")
    sleep.set_defaults(func=_selftest_sleep)


def _selftest_sleep(args: Any, reporter: Any) -> int:
    import time

    from rs_cluster.errors import ClusterError
    from rs_cluster.jobs import CANCEL_FILE

    children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"],
                                 start_new_session=bool(i % 2)) for i in range(args.children)]
    steps = max(args.steps, 1)
    reporter.start("sleep", total=steps, unit="steps", message=f"sleeping {args.seconds:g} s")
    try:
        for done in range(1, steps + 1):
            time.sleep(args.seconds / steps)
            reporter.progress(done, steps, message=f"slept {done}/{steps}")
            if done <= args.warnings:
                reporter.warning(f"selftest warning {done} of {args.warnings}")
    finally:
        for child in children:
            child.kill()
            child.wait()
    if args.fail:
        raise ClusterError("selftest-sleep failed on purpose (--fail)")
    if args.output:  # a path, or a URL in the job's shared storage (rs_cluster.storage)
        from rs_cluster import storage

        storage.write_bytes(args.output, b"slept\n")
    for extra in range(steps + 1, args.warnings + 1):  # more warnings than steps
        reporter.warning(f"selftest warning {extra} of {args.warnings}")
    reporter.finish("slept")
    if args.train_finish:
        import json

        fields = json.loads(args.train_finish)
        reporter.start("train", message="selftest: reporting as the train stage")
        reporter.finish(str(fields.pop("message", "trained")), **fields)
    if args.cancel_after:
        # The runner terminates a step still running once it is told to stop: ignore that, the
        # step is done; the runner runs this step in the job folder.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        Path(CANCEL_FILE).touch()
        os.kill(os.getppid(), signal.SIGTERM)
    return 0


def _pretend_host(argv: list[str]) -> list[str]:
    """Takes ``--as-host NAME`` off the front of ``argv`` and makes this process that host."""
    if len(argv) < 2 or argv[0] != "--as-host":
        return argv
    from rs_cluster import jobs

    name = argv[1]
    jobs.this_host = lambda: {"host": name, "boot_id": f"selftest-boot-of-{name}"}
    return argv[2:]


def main(argv: list[str] | None = None) -> int:
    from rs_cluster import cli, jobspec

    argv = _pretend_host(list(sys.argv[1:] if argv is None else argv))
    jobspec.STAGES = _with_sleep(jobspec.STAGES)
    if str(REPO) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = pythonpath()  # for the runners and steps it starts
    return cli.main(argv, entry_module=ENTRY_MODULE, extra_commands=(register,))


if __name__ == "__main__":
    sys.exit(main())
