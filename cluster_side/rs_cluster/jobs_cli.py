"""Sub-commands ``job ...``, ``env`` and the hidden ``selftest-sleep`` stage.

Machine-readable output (``--json``, ``job events``) is what the QGIS plugin reads over SSH; each is
one JSON document or JSON lines on stdout, nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rs_cluster.progress import Reporter


def register(subparsers: Any) -> None:
    job = subparsers.add_parser("job", help="submit, watch, cancel and clean jobs",
                                description="Jobs run detached in <workspace>/jobs/<job-id>/.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workspace", metavar="DIR",
                        help="workspace root (default $RS_CLUSTER_WORKSPACE or ~/.rs-cluster)")
    common.add_argument("--json", action="store_true", help="print JSON for programs")
    actions = job.add_subparsers(dest="action", required=True,
                                 metavar="{submit,status,events,cancel,list,clean}")

    p = actions.add_parser("submit", parents=[common], help="start a job detached")
    p.add_argument("spec", metavar="SPEC_OR_JOB_DIR",
                   help="a job spec JSON file, or a job folder holding job.json and its inputs")
    p.set_defaults(func=_submit)

    p = actions.add_parser("status", parents=[common], help="state and progress of a job")
    p.add_argument("job_id")
    p.set_defaults(func=_status)

    p = actions.add_parser("events", parents=[common], help="progress events as JSON lines")
    p.add_argument("job_id")
    p.add_argument("--since", type=int, default=0, metavar="N",
                   help="skip the first N events (the count already read)")
    p.set_defaults(func=_events)

    p = actions.add_parser("cancel", parents=[common], help="stop every process of a job")
    p.add_argument("job_id")
    p.set_defaults(func=_cancel)

    p = actions.add_parser("list", parents=[common], help="all jobs of the workspace")
    p.set_defaults(func=_list)

    p = actions.add_parser("clean", parents=[common], help="delete a finished job's folder")
    p.add_argument("job_id")
    p.set_defaults(func=_clean)

    p = actions.add_parser("_run", parents=[common])  # the detached runner; not for users
    p.add_argument("job_id")
    p.set_defaults(func=_run)

    env = subparsers.add_parser("env", help="versions of python, spark, horovod, tensorflow; GPUs")
    env.set_defaults(func=_env)

    sleep = subparsers.add_parser("selftest-sleep")  # a stage for tests: waits, reports progress
    sleep.add_argument("--seconds", type=float, default=1.0)
    sleep.add_argument("--steps", type=int, default=10)
    sleep.add_argument("--children", type=int, default=0,
                       help="also start N idle child processes, every other one in its own "
                       "session, as Spark JVMs and Horovod workers do")
    sleep.add_argument("--fail", action="store_true", help="fail at the end")
    sleep.set_defaults(func=_selftest_sleep)


def _workspace(args: argparse.Namespace) -> Any:
    from rs_cluster.jobs import Workspace

    return Workspace(args.workspace)


def _print_json(data: Any) -> None:
    print(json.dumps(data, ensure_ascii=False, default=str), flush=True)


def _submit(args: argparse.Namespace, reporter: Reporter) -> int:
    from rs_cluster import jobs

    status = jobs.submit(_workspace(args), Path(args.spec))
    if args.json:
        _print_json(status)
    else:
        print(status["job_id"])
    return 0 if status["state"] != "failed" else 1


def _status(args: argparse.Namespace, reporter: Reporter) -> int:
    from rs_cluster import jobs

    status = jobs.read_status(_workspace(args).existing_job_dir(args.job_id))
    if args.json:
        _print_json(status)
    else:
        print(f"{status['job_id']}: {status['state']} {status.get('stage') or ''} "
              f"{status.get('progress', 0):.0f}% {status.get('message') or ''}".rstrip())
    return 0


def _events(args: argparse.Namespace, reporter: Reporter) -> int:
    from rs_cluster import jobs

    lines, _ = jobs.read_events(_workspace(args).existing_job_dir(args.job_id), args.since)
    sys.stdout.writelines(line + "\n" for line in lines)
    return 0


def _cancel(args: argparse.Namespace, reporter: Reporter) -> int:
    from rs_cluster import jobs

    status = jobs.cancel(_workspace(args), args.job_id)
    if args.json:
        _print_json(status)
    else:
        print(f"{args.job_id}: {status['state']}")
    return 0


def _list(args: argparse.Namespace, reporter: Reporter) -> int:
    from rs_cluster import jobs

    found = jobs.list_jobs(_workspace(args))
    if args.json:
        _print_json(found)
    else:
        for job in found:
            print(f"{job['job_id']}  {job['state']:<10} {job.get('name') or ''}")
    return 0


def _clean(args: argparse.Namespace, reporter: Reporter) -> int:
    from rs_cluster import jobs

    jobs.clean(_workspace(args), args.job_id)
    if args.json:
        _print_json({"job_id": args.job_id, "cleaned": True})
    return 0


def _run(args: argparse.Namespace, reporter: Reporter) -> int:
    from rs_cluster import jobs

    return jobs.run_job(_workspace(args).existing_job_dir(args.job_id))


def _env(args: argparse.Namespace, reporter: Reporter) -> int:
    from rs_cluster.envinfo import environment

    _print_json(environment())
    return 0


def _selftest_sleep(args: argparse.Namespace, reporter: Reporter) -> int:
    import subprocess
    import time

    from rs_cluster.errors import ClusterError

    children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"],
                                 start_new_session=bool(i % 2)) for i in range(args.children)]
    steps = max(args.steps, 1)
    reporter.start("sleep", total=steps, unit="steps", message=f"sleeping {args.seconds:g} s")
    try:
        for done in range(1, steps + 1):
            time.sleep(args.seconds / steps)
            reporter.progress(done, steps, message=f"slept {done}/{steps}")
    finally:
        for child in children:
            child.kill()
            child.wait()
    if args.fail:
        raise ClusterError("selftest-sleep failed on purpose (--fail)")
    reporter.finish("slept")
    return 0
