"""Sub-commands ``job ...`` and ``env``.

Machine-readable output (``--json``, ``job events``) is what the QGIS plugin reads over SSH; each is
one JSON document or JSON lines on stdout, nothing else. ``job events --follow`` is for people at
a terminal on the login host: it shows a running job's events as the stages show their own, until
the job ends.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
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
                                 metavar="{submit,status,events,log,cancel,list,clean}")

    p = actions.add_parser("submit", parents=[common], help="start a job detached")
    p.add_argument("spec", metavar="SPEC_OR_JOB_DIR",
                   help="a job spec JSON file, or a job folder holding job.json and its inputs")
    p.set_defaults(func=_submit)

    p = actions.add_parser("status", parents=[common], help="state and progress of a job")
    p.add_argument("job_id")
    p.set_defaults(func=_status)

    p = actions.add_parser("events", parents=[common], help="progress events as JSON lines",
                           description="Prints the job's progress events as JSON lines. With "
                           "--follow, shows them as they come until the job ends, as progress "
                           "bars and lines (raw JSON lines with --json), and exits 0 when the job "
                           "succeeded, else 1; Ctrl-C stops following, not the job.")
    p.add_argument("job_id")
    p.add_argument("--since", type=int, default=0, metavar="N",
                   help="skip the first N events (the count already read)")
    p.add_argument("--follow", action="store_true",
                   help="keep showing new events until the job succeeds, fails or is cancelled")
    p.set_defaults(func=_events)

    p = actions.add_parser("log", parents=[common], help="the last lines of a job's log")
    p.add_argument("job_id")
    p.add_argument("--tail", type=int, default=50, metavar="N",
                   help="how many lines from the end (default 50)")
    p.set_defaults(func=_log)

    p = actions.add_parser("cancel", parents=[common], help="stop every process of a job")
    p.add_argument("job_id")
    p.set_defaults(func=_cancel)

    p = actions.add_parser("list", parents=[common], help="all jobs of the workspace")
    p.set_defaults(func=_list)

    p = actions.add_parser("clean", parents=[common], help="delete finished jobs' folders",
                           description="Deletes the folder of one job that is not running, or "
                           "with --older-than of every job that ended before then.")
    p.add_argument("job_id", nargs="?", metavar="JOB_ID")
    p.add_argument("--older-than", metavar="DURATION",
                   help="every job that succeeded, failed or was cancelled more than DURATION "
                   "ago (e.g. 7d, 12h, 30m); queued and running jobs are kept")
    p.set_defaults(func=_clean)

    p = actions.add_parser("_run", parents=[common])  # the detached runner; not for users
    p.add_argument("job_id")
    p.set_defaults(func=_run)

    env = subparsers.add_parser(
        "env", help="versions of python, spark, horovod, tensorflow; GPUs; the cluster settings",
        description="Prints JSON: the versions of the stack, the GPUs, and under \"cluster\" the "
        "effective settings (Spark master and where it came from, resources, storage URL and where "
        "its credentials come from; never the credentials).")
    env.add_argument("--probe", action="store_true",
                     help="also run a tiny Spark job: is the master reachable, do executors start "
                     "this Python and import TensorFlow and Horovod, can this host and every "
                     "executor write, read and delete a probe object at the storage URL; exits 1 "
                     "and lists the problems when any check fails")
    env.set_defaults(func=_env)


def _workspace(args: argparse.Namespace) -> Any:
    from rs_cluster.jobs import Workspace

    workspace = Workspace(args.workspace)
    workspace.tighten()  # workspaces made by older versions were readable by everyone
    return workspace


def _print_json(data: Any) -> None:
    print(json.dumps(data, ensure_ascii=False, default=str), flush=True)


def _submit(args: argparse.Namespace, reporter: Reporter) -> int:
    from rs_cluster import jobs

    status = jobs.submit(_workspace(args), Path(args.spec), entry_module=args.entry_module)
    if args.json:
        _print_json(status)
    else:
        print(status["job_id"])
    if status["state"] == "failed":  # the reason on stderr in both forms: callers show stderr
        print(f"rs-cluster job submit: job {status['job_id']} failed: {status.get('message')}",
              file=sys.stderr)
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


_FOLLOW_POLL_S = 0.5


def _events(args: argparse.Namespace, reporter: Reporter) -> int:
    from rs_cluster import jobs

    job_dir = _workspace(args).existing_job_dir(args.job_id)
    if args.follow:
        return _follow(job_dir, args)
    lines, _ = jobs.read_events(job_dir, args.since)
    sys.stdout.writelines(line + "\n" for line in lines)
    return 0


def _follow(job_dir: Path, args: argparse.Namespace) -> int:
    """Shows the job's events until it ends; 0 when it succeeded. The display is this command's
    output (stdout), whatever --quiet says of stage progress: a bar when stdout is a terminal,
    otherwise a line now and then. Ctrl-C ends only the following: the job runs detached."""
    from rs_cluster import jobs
    from rs_cluster.progress import TerminalReporter, clean_text, parse_event, render_event

    if not (job_dir / jobs.STATUS_FILE).exists():
        raise jobs.JobStateError(f"job {args.job_id} was never submitted; there is nothing to "
                                 f"follow (no {job_dir / jobs.STATUS_FILE})")
    tail = jobs.EventTail(job_dir, args.since)
    display = None if args.json else TerminalReporter(sys.stdout)
    try:
        while True:
            # The status first: the runner writes its last event before its final status, so
            # once the status says the job ended, every event it will ever have is in the file.
            status = jobs.read_status(job_dir)
            for line in tail.new_lines():
                if display is None:
                    print(line, flush=True)
                    continue
                try:
                    render_event(display, parse_event(line))
                except (ValueError, TypeError):  # a newer schema, or not an event: not shown
                    continue
            if status.get("state") in jobs.TERMINAL_STATES:
                break
            time.sleep(_FOLLOW_POLL_S)
    except KeyboardInterrupt:
        if display is not None:
            display.close()
        print(f"\nstopped following job {args.job_id}; it goes on running: `rs-cluster job events "
              f"{args.job_id} --follow` shows it again, `rs-cluster job cancel {args.job_id}` "
              "stops it", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... --follow --json | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1
    if display is not None:
        display.close()
        print(f"job {args.job_id} {clean_text(status.get('state'), 40)}: "
              f"{clean_text(status.get('message'), 1000)}".rstrip(), flush=True)
    return 0 if status.get("state") == "succeeded" else 1


def _log(args: argparse.Namespace, reporter: Reporter) -> int:
    from rs_cluster import jobs

    lines = jobs.read_log_tail(_workspace(args).existing_job_dir(args.job_id), args.tail)
    sys.stdout.writelines(line + "\n" for line in lines)
    return 0


def _cancel(args: argparse.Namespace, reporter: Reporter) -> int:
    from rs_cluster import jobs

    status = jobs.cancel(_workspace(args), args.job_id)
    if args.json:
        _print_json(status)
    elif status.get("cancel"):  # the runner is on another host: what it will do, or cannot
        print(f"{args.job_id}: {status['state']}; {status['cancel']}")
    elif status["state"] == "cancelled":
        print(f"{args.job_id}: cancelled")
    else:
        print(f"{args.job_id}: already {status['state']}; left as it is")
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

    from rs_cluster.errors import ConfigError

    if (args.job_id is None) == (args.older_than is None):
        raise ConfigError("job clean: give either a JOB_ID or --older-than DURATION")
    if args.job_id is not None:
        jobs.clean(_workspace(args), args.job_id)
        if args.json:
            _print_json({"job_id": args.job_id, "cleaned": True})
        return 0
    seconds = jobs.parse_duration(args.older_than)
    removed = jobs.clean_older_than(_workspace(args), seconds)
    if args.json:
        _print_json({"older_than_s": seconds, "cleaned": [job["job_id"] for job in removed]})
    else:
        for job in removed:
            print(f"removed {job['job_id']} ({job['state']}, ended {job['finished']})")
        if not removed:
            print(f"no job ended more than {args.older_than} ago")
    return 0


def _run(args: argparse.Namespace, reporter: Reporter) -> int:
    from rs_cluster import jobs

    return jobs.run_job(_workspace(args).existing_job_dir(args.job_id),
                        entry_module=args.entry_module)


def _env(args: argparse.Namespace, reporter: Reporter) -> int:
    from rs_cluster.envinfo import environment
    from rs_cluster.settings import report

    cluster = report()  # first: a settings file with a mistake is the answer, named
    if not args.probe:
        _print_json({**environment(), "cluster": cluster})
        return 0
    from rs_cluster.envinfo import probe

    found = probe()
    _print_json({**environment(), "cluster": cluster, "probe": found})
    for problem in found["problems"]:
        print(f"rs-cluster env --probe: {problem}", file=sys.stderr)
    return 1 if found["problems"] else 0
