"""`make demo`: from QGIS to a cluster and back, on real imagery, on this one machine.

It starts a cluster of separate hosts under build/demo/rig (tests/rig.py: each host has its own
127.0.0.x address and its own view of the filesystem; `login` runs OpenSSH, `master` the Spark
master, `worker1` and `worker2` a one-core Spark worker each, `storage` SeaweedFS's S3 gateway),
configures it as a cluster admin would (scripts/demo_rig.py), then drives the plugin's own code,
the same functions its QGIS tasks run, and after each job prints which host ran what. The rig
needs root (mount namespaces); without it, or with --single-host, the demo says so and starts
today's throwaway cluster on 127.0.0.1 instead (a Spark standalone master and worker, and an
OpenSSH server with its own host key and user key, all under build/demo/):

1. upload the training rasters over SFTP and run a job there: prepare tiles (Spark + Petastorm),
   train the U-Net with Horovod workers as Spark tasks;
2. upload rasters held out from training and run a second job: predict with the first job's model
   (it stays on the cluster), evaluate against the reference masks;
3. download the masks, polygons and report, load them into a QGIS project as the plugin does,
   and render the mask over the imagery with QGIS.

Ctrl-C (or a kill) cancels the job on the cluster and stops everything the demo started.
Runs in the QGIS venv (.venv-qgis); the cluster side runs in the cluster venv (.venv).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rs_qgis_plugin.core.jobs import RemoteJobs  # noqa: E402
from rs_qgis_plugin.core.profile import ConnectionProfile  # noqa: E402
from rs_qgis_plugin.core.protocol import JobStatus  # noqa: E402
from rs_qgis_plugin.core.ssh import SshClient, trust_host_key  # noqa: E402
from rs_qgis_plugin.logic import (  # noqa: E402
    MODE_EVALUATE,
    MODE_TRAIN,
    RasterPick,
    RunParams,
    classify_results,
    plan_job,
)
from scripts.demo_rig import CLUSTERS, DemoRig  # noqa: E402
from tests.rig import unavailable  # noqa: E402
from tests.spark_cluster import StandaloneCluster  # noqa: E402
from tests.sshd import Sshd  # noqa: E402

# Training: aerial imagery at about 0.3 m, like the held-out raster (see the data README).
TRAIN_SUBSETS = ("inria_austin_chicago", "inria_png_austin_chicago", "whu_aerial_christchurch")
# Held out from training: an Inria Austin crop that kept its CRS (EPSG:26914), 1000 x 1000 px.
HOLDOUT = (("deeposlandia_georef_samples", "inria_austin_sample.tif"),)
CLUSTER_PYTHON = REPO / ".venv" / "bin" / "python"


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: cancel on the cluster, stop the throwaway cluster, exit."""


def say(text: str) -> None:
    print(text, flush=True)


def training_picks(data: Path) -> list[RasterPick]:
    picks = []
    for subset in TRAIN_SUBSETS:
        if not (data / subset / "images").is_dir():
            say(f"   ({data / subset} is missing; training without it)")
            continue
        for image in sorted((data / subset / "images").iterdir()):
            picks.append(RasterPick(str(image), str(data / subset / "gt" / image.name), predict=False))
    return picks


def holdout_picks(data: Path) -> list[RasterPick]:
    return [RasterPick(str(data / subset / "images" / name), str(data / subset / "gt" / name))
            for subset, name in HOLDOUT]


class StatusPrinter:
    """The job's status as the plugin's jobs panel shows it: a line per new message, but step
    counts ("epoch 2/10 step 3/10") at most every ``every_s`` seconds."""

    def __init__(self, every_s: float = 15.0) -> None:
        self.every_s = every_s
        self.last = ("", "")
        self.last_time = 0.0

    def __call__(self, status: JobStatus) -> None:
        key = (status.stage or "", status.message)
        counting = " step " in status.message or status.message.endswith("rasters")
        now = time.monotonic()
        if key == self.last or (counting and key[0] == self.last[0]
                                and now - self.last_time < self.every_s):
            return
        self.last, self.last_time = key, now
        say(f"   [{status.state:9s} {status.progress:5.1f}%] {status.stage or '-'}: "
            f"{status.message[:110]}")


def run_job(jobs: RemoteJobs, planned, title: str, rig: DemoRig | None = None) -> JobStatus:
    """Uploads and starts a planned job, then follows it to its end (as the plugin's tasks do);
    on the rig, then says which host ran what."""
    import contextlib

    from rs_qgis_plugin.tasks import submit_planned, watch

    say(f"\n== {title}\n   job {planned.spec.job_id}: "
        + " -> ".join(s.stage for s in planned.spec.steps))
    started = time.monotonic()
    uploaded = [0.0]

    def upload_progress(percent: float) -> None:
        if percent >= uploaded[0] + 25 or percent >= 100 > uploaded[0]:
            uploaded[0] = percent
            say(f"   upload {percent:5.1f}%")

    submit_planned(jobs, planned, progress=upload_progress)
    with rig.watch_horovod() if rig else contextlib.nullcontext() as witness:
        status = watch(jobs, planned.spec.job_id, on_status=StatusPrinter(), poll_s=2.0)
    if status.state != "succeeded":
        raise SystemExit(f"demo: job {planned.spec.job_id} {status.state}: {status.message}")
    say(f"   ({time.monotonic() - started:.0f} s)")
    if rig is not None:
        say("   where it ran (Spark's event logs on login, processes seen on the hosts, the store):")
        for line in rig.report(planned.spec.job_id, witness):
            say(f"   {line}")
    return status


def render(image_path: str, layers: list, out: Path, title: str) -> None:
    """The loaded result layers over the imagery, drawn by QGIS's own map renderer."""
    from qgis.core import QgsMapRendererParallelJob, QgsMapSettings, QgsRasterLayer
    from qgis.PyQt.QtCore import QSize, Qt
    from qgis.PyQt.QtGui import QColor, QFont, QPainter

    image = QgsRasterLayer(image_path, "imagery", "gdal")
    if not image.isValid():
        raise SystemExit(f"demo: QGIS cannot open {image_path}")
    extent = image.extent()
    width = 1024
    height = int(width * extent.height() / extent.width())
    settings = QgsMapSettings()
    settings.setLayers([*layers, image])  # the first is drawn on top
    settings.setDestinationCrs(image.crs())
    settings.setExtent(extent)
    settings.setOutputSize(QSize(width, height))
    settings.setBackgroundColor(QColor("white"))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    picture = job.renderedImage()
    painter = QPainter(picture)
    band = max(24, width // 30)
    painter.setFont(QFont("Sans", max(10, width // 60)))
    painter.fillRect(0, 0, width, band, QColor(255, 255, 255, 200))
    painter.setPen(QColor("black"))
    painter.drawText(8, 0, width - 16, band, int(Qt.AlignVCenter), title)
    painter.end()
    if not picture.save(str(out), None, 85):
        raise SystemExit(f"demo: cannot write {out}")


def _figure(value: float | None) -> str:
    """A score of the report; None where it is undefined (precision of a mask with no building)."""
    return "n/a" if value is None else f"{value:.3f}"


def spark_home() -> Path:
    out = subprocess.run([str(CLUSTER_PYTHON), "-c",
                          "import os, pyspark; print(os.path.dirname(pyspark.__file__))"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def _single_host_profile(sshd: Sshd, out: Path) -> tuple[Path, ConnectionProfile]:
    # The plugin's connection profile. Its host key is trusted from the server's own key file
    # (what an administrator hands out), never from what the connection offers.
    known_hosts = out / "known_hosts"
    key_type, key_b64 = sshd.public_host_key
    trust_host_key(known_hosts, "127.0.0.1", sshd.port, key_type, key_b64)
    # The cluster's settings file: the throwaway cluster is this one machine, so its worker
    # sees the job folders (a real cluster names a store, or a workspace on a shared mount).
    settings = out / "cluster.toml"
    settings.write_text("[jobs]\nshared_workspace = true\n")
    settings.chmod(0o600)
    return known_hosts, ConnectionProfile(
        name="demo", host="127.0.0.1", port=sshd.port, user=sshd.user,
        key_file=str(sshd.user_key), remote_workspace=str(out / "cluster-workspace"),
        remote_command=("/usr/bin/env", "SPARK_LOCAL_IP=127.0.0.1",
                        f"RS_CLUSTER_CONFIG={settings}",
                        str(REPO / ".venv" / "bin" / "rs-cluster")))


def _rig_profile(rig: DemoRig, out: Path) -> tuple[Path, ConnectionProfile]:
    """The profile of an analyst whose cluster is the rig: SSH to login, jobs in its workspace."""
    sshd = rig.rig.sshd
    assert sshd is not None
    login = rig.login
    known_hosts = out / "known_hosts"
    key_type, key_b64 = sshd.public_host_key  # handed out by the admin, as above
    trust_host_key(known_hosts, login.address, sshd.port, key_type, key_b64)
    return known_hosts, ConnectionProfile(
        name="demo-rig", host=login.address, port=sshd.port, user=sshd.user,
        key_file=str(sshd.user_key), remote_workspace=rig.workspace,
        remote_command=rig.remote_command(REPO / ".venv" / "bin" / "rs-cluster"))


def _services(rig: DemoRig, name: str) -> str:
    r = rig.rig
    login = (f"OpenSSH on port {r.sshd.port if r.sshd else '-'}; the job runner there is the "
             "Spark driver")
    if rig.hadoop is not None:
        services = {"login": login,
                    "master": f"HDFS NameNode ({rig.hadoop.url}), YARN ResourceManager "
                              f"({rig.hadoop.resourcemanager_web})"}
        if name.startswith("worker"):
            return "HDFS DataNode, YARN NodeManager"
        return services.get(name, "(not used by the demo)")
    services = {"login": login, "master": f"Spark master {r.master_url}",
                "storage": f"SeaweedFS S3 at {r.s3.url if r.s3 else '-'}"}
    if name.startswith("worker"):
        return "Spark worker, one core"
    return services.get(name, "(not used by the demo)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "dev")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "demo")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2, help="Horovod workers (Spark tasks)")
    parser.add_argument("--cluster", choices=CLUSTERS, default="standalone",
                        help="on the rig: a Spark standalone master with S3 storage (default, "
                        "starts fastest), or YARN with HDFS (real Hadoop daemons)")
    parser.add_argument("--single-host", action="store_true",
                        help="the throwaway cluster on 127.0.0.1, not the multi-host rig")
    args = parser.parse_args()
    data, out = args.data.resolve(), args.out.resolve()
    needed = [data / TRAIN_SUBSETS[0] / "images",
              *(data / subset / "images" / name for subset, name in HOLDOUT)]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise SystemExit(f"demo: {data} does not hold the dev imagery ({', '.join(missing)} "
                         "missing); pass DATA=/path/to/dev")
    if not CLUSTER_PYTHON.exists():
        raise SystemExit("demo: the cluster venv .venv is missing; run make setup")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.monotonic()

    stopping: list[int] = []

    def interrupted(signum: int, frame: object) -> None:
        if stopping:  # a second Ctrl-C must not cut the clean-up short
            say("demo: still cancelling the job and stopping the cluster ...")
            return
        stopping.append(signum)
        raise Interrupted(signal.Signals(signum).name)

    # Installed explicitly, SIGINT included: a shell that starts us in the background leaves
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler of its own.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)

    from qgis.core import QgsApplication, QgsProject

    # QGIS keeps its settings under build/demo, not in the user's profile.
    app = QgsApplication([], False, str(out / "qgis-profile"))
    app.initQgis()

    cluster = sshd = client = rig = None
    active: str | None = None
    try:
        why_not = "--single-host was given" if args.single_host else unavailable()
        if args.cluster == "yarn":  # nothing to fall back to: YARN needs the rig's hosts
            from tests.hadoop_daemons import unavailable as hadoop_unavailable

            cannot = why_not or hadoop_unavailable()
            if cannot:
                raise SystemExit(f"demo: --cluster yarn runs on the multi-host rig with real "
                                 f"Hadoop daemons, which cannot start here: {cannot}")
        if why_not is None:
            say(f"== a cluster of separate hosts on this machine (the multi-host rig, in "
                f"{out / 'rig'}): each its own address and filesystem")
            try:
                rig = DemoRig(out / "rig", CLUSTER_PYTHON, args.cluster).start()
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:  # stopped already
                raise SystemExit(f"demo: the multi-host rig did not start ({type(e).__name__}: "
                                 f"{e}); --single-host runs the demo on one host") from None
            for host in rig.rig.hosts.values():
                say(f"   {host.name:8s} {host.address:10s} {_services(rig, host.name)}")
            known_hosts, profile = _rig_profile(rig, out)
            master = None  # login's cluster.toml names it, as an admin sets it up
        else:
            say(f"== no multi-host rig ({why_not}): falling back to the single-host throwaway "
                f"cluster on 127.0.0.1 (in {out})")
            cluster = StandaloneCluster(out / "spark", cores=max(2, args.workers), memory="4g",
                                        python=str(CLUSTER_PYTHON), spark_home=spark_home()).start()
            say(f"   Spark master {cluster.master_url}, one worker with {cluster.cores} cores")
            sshd = Sshd(out / "sshd").start()
            say(f"   OpenSSH server on 127.0.0.1:{sshd.port}, host key {sshd.host_key_fingerprint}")
            known_hosts, profile = _single_host_profile(sshd, out)
            master = cluster.master_url
        client = SshClient(profile, known_hosts).connect()
        jobs = RemoteJobs(client)
        env = jobs.env()
        say(f"   connected over SSH: rs-cluster {env.get('rs_cluster')}, Spark {env.get('spark')}, "
            f"Horovod {env.get('horovod')}, TensorFlow {env.get('tensorflow')}")
        if rig is not None:
            settings = env.get("cluster") or {}
            say(f"   login's settings: {settings.get('runs_on')}; storage "
                f"{(settings.get('storage') or {}).get('url')}")

        common = {"workers": args.workers, "epochs": args.epochs, "master": master}
        train = plan_job("demo training", RunParams(
            mode=MODE_TRAIN, stride=64, base_filters=16, learning_rate=1e-3, patience=0, dice=True,
            arch="unet2019", **common), training_picks(data))
        active = train.spec.job_id
        run_job(jobs, train, f"train: {len(train.inputs) // 2} image/mask pairs uploaded, "
                f"U-Net with {args.workers} Horovod worker(s), {args.epochs} epoch(s)", rig)
        active = None

        holdout = holdout_picks(data)
        evaluate = plan_job("demo held-out", RunParams(
            mode=MODE_EVALUATE, model_job=train.spec.job_id, **common), holdout)
        active = evaluate.spec.job_id
        run_job(jobs, evaluate, f"predict + evaluate: {len(holdout)} raster(s) held out from "
                "training, with the model left on the cluster by the training job", rig)
        active = None

        from rs_qgis_plugin.results import load_results
        from rs_qgis_plugin.tasks import fetch

        say("\n== download the results and load them into QGIS")
        fetched = fetch(jobs, evaluate.spec.job_id, evaluate.fetch, out / "download")
        project = QgsProject.instance()
        results = classify_results(fetched)
        layers, summary = load_results(project, evaluate.spec.job_id, "held-out predictions",
                                       results)
        for layer in layers:
            say(f"   layer '{layer.name()}' ({layer.crs().authid() or 'no CRS'})")
        (out / "masks").mkdir()
        for path in [*results.masks, *results.polygons]:
            shutil.copy2(path, out / "masks" / Path(path).name)
        shutil.copy2(results.report, out / "report.json")
        project.write(str(out / "demo.qgz"))

        report = json.loads((out / "report.json").read_text())
        pooled = report.get("pooled", report)
        from qgis.core import QgsRasterLayer

        polygons_first = sorted(layers, key=lambda lyr: isinstance(lyr, QgsRasterLayer))
        render(holdout[0].image, polygons_first,
               out / "overlay.png", f"predicted buildings after {args.epochs} epoch(s) - "
               f"IoU {_figure(pooled['iou'])}, F1 {_figure(pooled['f1'])}")

        say(f"\ndemo finished in {time.monotonic() - started:.0f} s. In {out}:")
        for rel in ("overlay.png", "report.json", "demo.qgz"):
            say(f"  {rel}")
        for path in sorted((out / "masks").iterdir()):
            say(f"  masks/{path.name}")
        say(f"\nbuilding IoU on the held-out raster: {_figure(pooled['iou'])} "
            f"(F1 {_figure(pooled['f1'])}, precision {_figure(pooled['precision'])}, "
            f"recall {_figure(pooled['recall'])}); {summary or ''}")
        say(f"picture: {out / 'overlay.png'}")
        return 0
    except (KeyboardInterrupt, Interrupted) as e:
        say(f"\ndemo: interrupted ({type(e).__name__} {e}); cancelling and stopping the cluster")
        if active and client is not None:
            try:
                state = RemoteJobs(client).cancel(active).state
                say(f"   job {active} {state}")
            except Exception as cancel_error:  # noqa: BLE001 - report and go on stopping
                say(f"   could not cancel job {active}: {cancel_error}")
        return 130
    finally:
        if client is not None:
            client.close()
        for part in (sshd, cluster, rig):
            if part is not None:
                part.stop()


if __name__ == "__main__":
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("XDG_RUNTIME_DIR", str(REPO / "build" / ".xdg-runtime"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ["GDAL_PAM_ENABLED"] = "NO"  # no .aux.xml beside the shared dev rasters
    try:
        code = main()
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # noqa: BLE001 - one clear line, then out without QGIS's teardown
        import traceback

        traceback.print_exc()
        print(f"demo: failed: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # QGIS 3.22 can crash while tearing down after a headless render; everything is written.
    os._exit(code)
