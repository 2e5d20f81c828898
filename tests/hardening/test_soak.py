"""Soak: a steady mixed load at five times a regional network's daily peak, end to end, for hours.

The assumed network: a regional imaging network serving about 2 million people does roughly 1,000 chest
radiographs on a weekday, about 15 % of them in its busiest hour: a peak of 150 instances an hour.
Five times that peak is 750 instances an hour (one every 4.8 s on average), sent as studies of one or two
images (1.3 on average) arriving at random (a Poisson process), each study over its own association from
one of four sending threads, so associations overlap when arrivals bunch up.

The mix is real: cxr3 PNGs (all three classes) wrapped as DX For Presentation (70 %), and the pydicom-data
radiograph RG1 as JPEG 2000 lossy (15 %), uncompressed 1955 x 1841 (10 %) and JPEG 2000 lossless (5 %).
`screener serve` classifies with a small model (inference is not the bottleneck on 2 cores) and delivers
every study's SR to a real Orthanc.

Checked at the end: 0 lost (every 0x0000 has its row and spool file, ends classified exactly once, and
its study's SR is in Orthanc); memory (RSS of serve and its children) and open files flat: the slope of a
linear regression after the warm-up is reported, and in runs of 20 minutes or more it is held to a bound;
latency percentiles per interval (an hour at full strength, ``HARDENING_SOAK_INTERVAL`` otherwise).

``HARDENING_SOAK_SECONDS`` (default 40 in CI; ``tests/hardening/run`` sets 7200) and
``HARDENING_SOAK_RATE_PER_HOUR`` (default 750) scale it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from screener.core.pynetdicom_compat import keep_responses_for_caller
from tests.hardening.conftest import Figure, percentile, proc_status, tree_rss_kib
from tests.helpers import Orthanc, Server, assert_spool_consistent, cli, rg1_dir, wait_for, wrap_png_as_dx


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


PEAK_PER_HOUR = 150  # the assumed regional network's busiest hour (see the module docstring)
DEFAULT_RATE_PER_HOUR = 5 * PEAK_PER_HOUR
DEFAULT_SECONDS = 40.0
SENDERS = 4
WARM_UP_FRACTION = 0.2  # samples before this share of the run are left out of the slopes
RSS_SLOPE_BOUND_MIB_PER_HOUR = 16.0  # at most ~0.4 GiB a day: anything steeper is a leak to chase
FD_GROWTH_BOUND = 8  # open files may wobble by a few sockets, never climb
pytestmark = [
    pytest.mark.slow,
    # the load itself, plus set-up, draining and checks (pytest-timeout's default would cut a long run)
    pytest.mark.timeout(_env_float("HARDENING_SOAK_SECONDS", DEFAULT_SECONDS) + 1800),
]
MIX = (("cxr3_dx", 0.70), ("RG1_J2KI", 0.15), ("RG1_UNCR", 0.10), ("RG1_J2KR", 0.05))

SETTINGS = {
    "SCREENER__INFERENCE__POLL_SECONDS": "0.2",
    "SCREENER__INFERENCE__PREPROCESS_WORKERS": "1",
    "SCREENER__INFERENCE__MAX_BATCH": "16",
    "SCREENER__INFERENCE__STUDY_SETTLE_SECONDS": "5",
    "SCREENER__PACS__BACKOFF_INITIAL_SECONDS": "1",
    "SCREENER__PACS__BACKOFF_MAX_SECONDS": "10",
    "SCREENER__PACS__SWEEP_SECONDS": "0.5",
    "SCREENER__PACS__TIMEOUT_SECONDS": "30",
}


@dataclass(frozen=True)
class Sent:
    uid: str
    study: str
    kind: str
    status: int | None
    at: float  # seconds since the load started
    rtt_ms: float


class Sources:
    """Builds fresh instances (new UIDs each time) from the real cxr3 PNGs and RG1 files."""

    def __init__(self, cxr3: Path, rng: random.Random) -> None:
        self.rng = rng
        self.pngs = [
            p for cls in ("normal", "covid19", "viral_pneumonia") for p in sorted((cxr3 / cls).glob("*.png"))
        ]
        self.rg1: dict[str, Dataset] = {}
        for kind, _ in MIX[1:]:
            ds = dcmread(rg1_dir() / f"{kind}.dcm")
            if 0xFFFCFFFC in ds:  # trailing padding may be dropped on the wire (PS3.5 7.5.1)
                del ds[0xFFFCFFFC]
            self.rg1[kind] = ds
        self._lock = threading.Lock()

    def kind(self) -> str:
        with self._lock:
            return self.rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]

    def instance(self, kind: str, study_uid: str, series_uid: str) -> Dataset:
        if kind == "cxr3_dx":
            with self._lock:
                png = self.rng.choice(self.pngs)
            ds = wrap_png_as_dx(png, study_uid=study_uid)
        else:
            ds = copy.deepcopy(self.rg1[kind])
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        return ds


def _send_study(
    port: int,
    study: list[tuple[str, Dataset]],
    started: float,
    calling: str,
    spans: list[tuple[float, float]],
) -> list[Sent]:
    """One association for one study, as a PACS forwarding it would; every store timed, and the
    association's (opened, released) time appended to ``spans``."""
    datasets = [ds for _, ds in study]
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for context in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}:
        ae.add_requested_context(*context)
    out: list[Sent] = []
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRSCREENER")
    if not assoc.is_established:
        return [Sent(str(d.SOPInstanceUID), str(d.StudyInstanceUID), k, None, 0.0, 0.0) for k, d in study]
    keep_responses_for_caller(assoc)
    opened = time.monotonic()
    try:
        for kind, ds in study:
            at = time.monotonic()
            try:
                rsp = assoc.send_c_store(ds)
                status = int(rsp.Status) if rsp and "Status" in rsp else None
            except (RuntimeError, OSError, ValueError):
                status = None
            done = time.monotonic()
            out.append(
                Sent(
                    str(ds.SOPInstanceUID),
                    str(ds.StudyInstanceUID),
                    kind,
                    status,
                    at - started,
                    (done - at) * 1e3,
                )
            )
    finally:
        if assoc.is_established:
            assoc.release()
        spans.append((opened, time.monotonic()))
    return out


def overlap(spans: list[tuple[float, float]]) -> tuple[int, float]:
    """The most associations open at once, and the share of open-association time spent with company."""
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    open_now, most, alone, shared, last = 0, 0, 0.0, 0.0, 0.0
    for at, step in edges:
        if open_now == 1:
            alone += at - last
        elif open_now > 1:
            shared += (at - last) * open_now
        open_now += step
        most = max(most, open_now)
        last = at
    return most, shared / (alone + shared) if alone + shared else 0.0


class Sampler:
    """Every ``interval`` seconds: seconds since start, RSS of serve + children (MiB), open descriptors;
    and, to tell a leak in serve from one in its pool, serve's own RSS (MiB) in ``serve_mib``."""

    def __init__(self, pid: int, interval: float) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float, int]] = []
        self.serve_mib: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()

    def _fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except FileNotFoundError:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(
                (time.monotonic() - self._started, tree_rss_kib(self.pid) / 1024, self._fds())
            )
            self.serve_mib.append(proc_status(self.pid).get("VmRSS", 0) / 1024)

    @contextlib.contextmanager
    def running(self) -> Iterator[Sampler]:
        self._started = time.monotonic()
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=10)

    def after_warm_up(self) -> list[tuple[float, float, int]]:
        skip = int(len(self.samples) * WARM_UP_FRACTION)
        return self.samples[skip:]


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour; 0.0 with fewer than 3 points."""
    if len(points) < 3:
        return 0.0
    x = np.array([p[0] for p in points]) / 3600
    y = np.array([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def _seconds(later: datetime | str, earlier: datetime | str) -> float:
    a = later if isinstance(later, datetime) else datetime.fromisoformat(str(later))
    b = earlier if isinstance(earlier, datetime) else datetime.fromisoformat(str(earlier))
    return (a.replace(tzinfo=None) - b.replace(tzinfo=None)).total_seconds()


def _pcts(values: list[float]) -> str:
    if not values:
        return "-"
    return " / ".join(f"{percentile(values, q):.0f}" for q in (50, 95, 99))


def test_soak_at_five_times_the_regional_peak(
    make_server, tiny_model_dir: Path, cxr3_dir: Path, tmp_path: Path, figure: Figure
):
    duration = _env_float("HARDENING_SOAK_SECONDS", DEFAULT_SECONDS)
    rate_per_hour = _env_float("HARDENING_SOAK_RATE_PER_HOUR", DEFAULT_RATE_PER_HOUR)
    interval = _env_float("HARDENING_SOAK_INTERVAL", 3600.0 if duration >= 7200 else max(duration / 6, 15.0))
    rng = random.Random(16)
    sources = Sources(cxr3_dir, rng)

    server: Server = make_server(**SETTINGS)
    orthanc = Orthanc(tmp_path / "orthanc", screener_port=server.port)
    server.overrides["SCREENER__PACS__DESTINATIONS"] = (
        f'[{{ae_title="ORTHANC", host="127.0.0.1", port={orthanc.dicom_port}}}]'
    )
    cli(server, "db", "upgrade")
    cli(server, "models", "register", str(tiny_model_dir), "--activate")
    orthanc.start()
    try:
        server.start()
        assert server.proc is not None
        sent: list[Sent] = []
        spans: list[tuple[float, float]] = []
        lock = threading.Lock()
        work: queue.Queue[list[tuple[str, Dataset]] | None] = queue.Queue()
        started = time.monotonic()

        def sender(k: int) -> None:
            while (study := work.get()) is not None:
                result = _send_study(server.port, study, started, calling=f"SOAK{k}", spans=spans)
                with lock:
                    sent.extend(result)

        studies_per_second = rate_per_hour / 3600 / 1.3
        threads = [threading.Thread(target=sender, args=(k,), daemon=True) for k in range(SENDERS)]
        sampler = Sampler(server.proc.pid, interval=max(2.0, min(30.0, duration / 60)))
        with sampler.running():
            for t in threads:
                t.start()
            next_at = started
            while next_at - started < duration:
                next_at += rng.expovariate(studies_per_second)
                time.sleep(max(0.0, next_at - time.monotonic()))
                study_uid, series_uid = generate_uid(), generate_uid()
                size = 2 if rng.random() < 0.3 else 1
                kinds = [sources.kind() for _ in range(size)]
                work.put([(k, sources.instance(k, study_uid, series_uid)) for k in kinds])
            for _ in threads:
                work.put(None)
            for t in threads:
                t.join(timeout=600)
            load_seconds = time.monotonic() - started

            acked = {s.uid: s for s in sent if s.status == 0x0000}
            not_ok = [s for s in sent if s.status != 0x0000]

            def finished() -> bool:
                rows = server.rows(
                    "SELECT count(*) FROM instances WHERE status IN ('classified', 'skipped', 'failed')"
                )
                return int(rows[0][0]) >= len(acked)

            wait_for(finished, 600, f"{len(acked)} instances classified")
            study_uids = {s.study for s in acked.values()}

            def delivered() -> bool:
                rows = server.rows("SELECT count(*) FROM deliveries WHERE status = 'sent'")
                return int(rows[0][0]) >= len(study_uids)

            wait_for(delivered, 600, f"an SR sent for each of {len(study_uids)} studies")
        drained_seconds = time.monotonic() - started - load_seconds

        # --- 0 lost ---------------------------------------------------------------------------------
        rows = {
            r[0]: r
            for r in server.rows(
                "SELECT i.sop_instance_uid, i.status, i.received_at, count(p.id), max(p.created_at) "
                "FROM instances i LEFT JOIN predictions p ON p.instance_id = i.id "
                "GROUP BY i.sop_instance_uid, i.status, i.received_at"
            )
        }
        missing = set(acked) - set(rows)
        not_classified = {u: rows[u][1] for u in acked if u in rows and rows[u][1] != "classified"}
        not_once = {u: rows[u][3] for u in acked if u in rows and rows[u][3] != 1}
        assert_spool_consistent(server)  # every row's file with its hash; no orphan, no temporary
        deliveries = server.rows(
            "SELECT s.study_instance_uid, d.status, d.sent_at FROM deliveries d "
            "JOIN study_results r ON r.id = d.study_result_id JOIN studies s ON s.id = r.study_id"
        )
        sent_for = {uid for uid, status, _ in deliveries if status == "sent"}
        undelivered = study_uids - sent_for
        in_orthanc = {
            s["MainDicomTags"]["StudyInstanceUID"]
            for s in orthanc.post("/tools/find", {"Level": "Study", "Query": {}, "Expand": True})
        }
        sr_missing = study_uids - in_orthanc
        not_sent = [d for d in deliveries if d[1] != "sent"]

        # --- latency per interval -------------------------------------------------------------------
        first_received = min(rows[u][2] for u in acked)
        last_received_of: dict[str, datetime | str] = {}
        for s in acked.values():
            received = rows[s.uid][2]
            prior = last_received_of.get(s.study)
            if prior is None or _seconds(received, prior) > 0:
                last_received_of[s.study] = received
        n_intervals = max(1, int(np.ceil(load_seconds / interval)))
        per: list[dict[str, list[float]]] = [
            {"rtt": [], "classify": [], "deliver": []} for _ in range(n_intervals)
        ]
        for s in acked.values():
            bucket = per[min(n_intervals - 1, int(s.at // interval))]
            bucket["rtt"].append(s.rtt_ms)
            bucket["classify"].append(_seconds(rows[s.uid][4], rows[s.uid][2]) * 1e3)
        for study_uid, _, sent_at in deliveries:
            if sent_at is None or study_uid not in last_received_of:
                continue
            last = last_received_of[study_uid]
            bucket = per[min(n_intervals - 1, int(max(0.0, _seconds(last, first_received)) // interval))]
            bucket["deliver"].append(_seconds(sent_at, last) * 1e3)
        table = [
            {
                "interval": i + 1,
                "stores": len(b["rtt"]),
                "c_store_rtt_ms_p50_p95_p99": _pcts(b["rtt"]),
                "to_classified_ms_p50_p95_p99": _pcts(b["classify"]),
                "to_sr_sent_ms_p50_p95_p99": _pcts(b["deliver"]),
            }
            for i, b in enumerate(per)
        ]

        # --- memory and open files ------------------------------------------------------------------
        steady = sampler.after_warm_up()
        rss_slope = slope_per_hour([(t, rss) for t, rss, _ in steady])
        skip = len(sampler.samples) - len(steady)
        serve_slope = slope_per_hour(
            [(t, mib) for (t, _, _), mib in zip(steady, sampler.serve_mib[skip:], strict=False)]
        )
        fd_slope = slope_per_hour([(t, float(fds)) for t, _, fds in steady])
        first_half = [fds for _, _, fds in steady[: len(steady) // 2]] or [0]
        second_half = [fds for _, _, fds in steady[len(steady) // 2 :]] or [0]

        kinds = {k: sum(1 for s in acked.values() if s.kind == k) for k, _ in MIX}
        figure(
            "soak.duration",
            round(load_seconds / 60, 1),
            "min",
            rate_per_hour=rate_per_hour,
            assumed_peak_per_hour=PEAK_PER_HOUR,
            drain_after_load_s=round(drained_seconds, 1),
        )
        figure("soak.instances_acknowledged", len(acked), "instances", studies=len(study_uids), mix=kinds)
        figure("soak.not_success", len(not_ok), "C-STOREs", examples=[(s.kind, s.status) for s in not_ok[:5]])
        figure(
            "soak.lost",
            len(missing) + len(not_classified) + len(not_once) + len(undelivered) + len(sr_missing),
            "instances or studies",
            no_row=len(missing),
            not_classified=len(not_classified),
            not_once=len(not_once),
            study_without_sent_sr=len(undelivered),
            study_sr_not_in_orthanc=len(sr_missing),
        )
        most_open, shared_share = overlap(spans)
        figure(
            "soak.associations",
            len(spans),
            "associations",
            most_open_at_once=most_open,
            share_of_association_time_with_another_open=round(shared_share, 3),
        )
        figure("soak.sr_in_orthanc", len(in_orthanc & study_uids), "studies", of=len(study_uids))
        figure(
            "soak.rss_slope",
            round(rss_slope, 2),
            "MiB/h",
            samples=len(steady),
            first_mib=round(steady[0][1], 1) if steady else 0,
            last_mib=round(steady[-1][1], 1) if steady else 0,
            peak_mib=round(max((r for _, r, _ in sampler.samples), default=0), 1),
            serve_alone_slope_mib_per_h=round(serve_slope, 2),
            serve_alone_first_last_mib=[
                round(sampler.serve_mib[skip], 1) if sampler.serve_mib[skip:] else 0,
                round(sampler.serve_mib[-1], 1) if sampler.serve_mib else 0,
            ],
        )
        figure(
            "soak.open_files_slope",
            round(fd_slope, 2),
            "fds/h",
            first=steady[0][2] if steady else 0,
            last=steady[-1][2] if steady else 0,
            max_first_half=max(first_half),
            max_second_half=max(second_half),
        )
        figure("soak.latency_per_interval", len(table), "intervals", interval_s=round(interval), table=table)
        _plot(sampler.samples, sampler.serve_mib, table, load_seconds)

        assert not_ok == [], f"{len(not_ok)} stores not answered 0x0000: {not_ok[:3]}"
        assert not missing, f"{len(missing)} acknowledged instances have no row"
        assert not not_classified, f"acknowledged but not classified: {list(not_classified.values())[:5]}"
        assert not not_once, (
            f"acknowledged instances without exactly one prediction: {list(not_once.values())[:5]}"
        )
        assert not undelivered, f"{len(undelivered)} studies without a sent SR"
        assert not sr_missing, f"{len(sr_missing)} studies whose SR Orthanc does not hold"
        assert not not_sent, f"deliveries left unsent: {not_sent[:3]}"
        assert max(second_half) <= max(first_half) + FD_GROWTH_BOUND, "open files keep climbing"
        if load_seconds >= 1200:  # shorter runs are all warm-up: the slope is reported, not judged
            assert rss_slope < RSS_SLOPE_BOUND_MIB_PER_HOUR, f"RSS grows {rss_slope:.1f} MiB/h"
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()
        orthanc.stop()


def _plot(
    samples: list[tuple[float, float, int]],
    serve_mib: list[float],
    table: list[dict[str, object]],
    seconds: float,
) -> None:
    """RSS and open files over time next to the figures file (``var/soak.png`` by default), and every
    sample as ``soak-samples.csv`` beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(os.environ.get("HARDENING_FIGURES") or "var/hardening-figures.jsonl").with_name("soak.png")
    fig, (ax_rss, ax_fd) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    minutes = [t / 60 for t, _, _ in samples]
    ax_rss.plot(minutes, [r for _, r, _ in samples], label="serve + pool")
    ax_rss.plot(minutes[: len(serve_mib)], serve_mib[: len(minutes)], label="serve alone")
    ax_rss.set_ylabel("RSS (MiB)")
    ax_rss.legend(loc="lower right")
    ax_fd.plot(minutes, [f for _, _, f in samples], color="tab:orange")
    ax_fd.set_ylabel("open files")
    ax_fd.set_xlabel("minutes")
    fig.suptitle(f"Soak: {seconds / 60:.0f} min, {sum(int(str(r['stores'])) for r in table)} stores")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    lines = ["seconds,rss_serve_and_pool_mib,rss_serve_mib,open_files"]
    lines += [
        f"{t:.1f},{rss:.1f},{serve:.1f},{fds}"
        for (t, rss, fds), serve in zip(samples, serve_mib, strict=False)
    ]
    out.with_name("soak-samples.csv").write_text("\n".join(lines) + "\n")
