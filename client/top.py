"""`sdmesh top`: a live table from the services' Prometheus metrics endpoints (services/metrics.py names them).

    sdmesh top 127.0.0.1:9100 127.0.0.1:9101 [--interval 2] [--once]

    ADDRESS          STAGE         QUEUE  OCCUP  CHUNK p50  REQ p50  REQ p99  IMAGES  IMG/S  ERRORS
    127.0.0.1:9101   denoiser          2   0.50     410ms     2.1s     4.8s      12   0.50  INVALID_ARGUMENT=1

One row per stage an endpoint reports. Latency percentiles are estimated from the histogram buckets
as Prometheus' histogram_quantile does (linear within a bucket); they cover the time since the last
scrape, or since the service started on the first one (and with --once). IMG/S is the rate since
the last scrape. Light client only: the text exposition format is parsed here, with no
prometheus_client.

TLS: services started with --tls-cert serve https:// (and with --tls-client-ca want a client certificate):

    sdmesh top https://127.0.0.1:9100 --tls-ca ca.pem --tls-cert client.pem --tls-key client-key.pem

With --tls-ca or --tls-cert an address without a scheme means https://.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import math
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

PREFIX = "sdmesh_"


class ScrapeError(Exception):
    """An endpoint that could not be read, or is not an sdmesh metrics endpoint, or TLS files that could not be
    read: the message says which and why."""


def ssl_context(ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext | None:
    """A client context for https:// endpoints: trust `ca` (None: the system's roots), present `cert`/`key`.

    None when no file is given. ScrapeError naming the flag for a file that cannot be used."""
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise ScrapeError("give --tls-cert and --tls-key together (a client certificate and its key)")
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except (OSError, ssl.SSLError) as e:
        raise ScrapeError(f"--tls-ca {ca}: not a readable PEM CA certificate ({e})") from None
    if cert is not None:
        try:
            context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as e:
            raise ScrapeError(
                f"--tls-cert {cert} / --tls-key {key}: not a readable certificate and its private key ({e})"
            ) from None
    return context


# --- the text exposition format -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    name: str  # e.g. "sdmesh_request_seconds_bucket"
    labels: dict[str, str]
    value: float


def parse_exposition(text: str) -> list[Sample]:
    """Prometheus' text format (version 0.0.4) → samples; comments and blank lines skipped.

    Raises ValueError naming the line that is not `name{label="value",...} value [timestamp]`.
    """
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            samples.append(_parse_line(line))
        except (ValueError, IndexError):
            raise ValueError(f"line {number} is not a Prometheus sample: {line[:80]!r}") from None
    return samples


def _parse_line(line: str) -> Sample:
    brace = line.find("{")
    space = line.find(" ")
    labels: dict[str, str] = {}
    if brace != -1 and (space == -1 or brace < space):
        name, i = line[:brace], brace + 1
        while True:
            while line[i] in " ,":
                i += 1
            if line[i] == "}":
                i += 1
                break
            eq = line.index("=", i)
            key = line[i:eq].strip()
            if line[eq + 1] != '"':
                raise ValueError(line)
            value, i = _quoted(line, eq + 2)
            labels[key] = value
        rest = line[i:].split()
    else:
        name, *rest = line.split()
    if not name or not rest:
        raise ValueError(line)
    return Sample(name, labels, float(rest[0]))  # float() reads NaN, +Inf, -Inf


def _quoted(line: str, i: int) -> tuple[str, int]:
    """A label value from just after its opening quote → (value, index after its closing quote)."""
    out = []
    while line[i] != '"':
        if line[i] == "\\":
            i += 1
            out.append({"n": "\n", "\\": "\\", '"': '"'}.get(line[i], "\\" + line[i]))
        else:
            out.append(line[i])
        i += 1
    return "".join(out), i + 1


def scrape(address: str, timeout: float = 5.0, context: ssl.SSLContext | None = None) -> list[Sample]:
    """GET http://address/metrics (https:// with a `context`, or when the address says so) and parse it;
    ScrapeError if unreachable or not an sdmesh metrics endpoint."""
    scheme = "https" if context is not None else "http"
    url = address if address.startswith(("http://", "https://")) else f"{scheme}://{address}"
    url = url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            text = response.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        raise ScrapeError(f"{address}: {url} answered HTTP {e.code} {e.reason}: not a metrics endpoint") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLError):
            raise ScrapeError(
                f"{address}: TLS with {url} failed ({e.reason}); give --tls-ca with the CA that signed the "
                "service's certificate, and --tls-cert/--tls-key if it requires a client certificate"
            ) from None
        raise ScrapeError(
            f"{address}: cannot reach {url} ({e.reason}); is the service running with --metrics-port?"
        ) from None
    except ssl.SSLError as e:  # a handshake the server ended while the response was read
        raise ScrapeError(
            f"{address}: TLS with {url} failed ({e}); does the service require a client certificate "
            "(--tls-cert/--tls-key)?"
        ) from None
    except (http.client.HTTPException, ConnectionError, UnicodeDecodeError, TimeoutError) as e:
        # no message: a gRPC port answers HTTP/1.1 with HTTP/2 frames, and BadStatusLine would quote their bytes
        raise ScrapeError(
            f"{address}: {url} did not answer as an HTTP metrics endpoint ({type(e).__name__}); "
            f"is this the service's gRPC port rather than its --metrics-port, or an https:// endpoint "
            f"(give --tls-ca)?"
        ) from None
    try:
        samples = parse_exposition(text)
    except ValueError as e:
        raise ScrapeError(f"{address}: {url} is not a Prometheus metrics endpoint ({e})") from None
    if not any(s.name.startswith(PREFIX) and "stage" in s.labels for s in samples):
        raise ScrapeError(f"{address}: {url} has no sdmesh_* metrics: not an sdmesh service's --metrics-port")
    return samples


# --- one stage's summary ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts by upper bound (the last is +Inf), as scraped."""

    buckets: tuple[tuple[float, float], ...]  # (le, cumulative count), sorted by le

    @property
    def count(self) -> float:
        return self.buckets[-1][1] if self.buckets else 0.0

    def minus(self, earlier: Histogram | None) -> Histogram:
        """The observations since `earlier` (a scrape of the same histogram); itself when there is none or it reset."""
        if (
            earlier is None
            or [le for le, _ in earlier.buckets] != [le for le, _ in self.buckets]
            or earlier.count > self.count
        ):
            return self
        return Histogram(tuple((le, n - m) for (le, n), (_, m) in zip(self.buckets, earlier.buckets)))

    def quantile(self, q: float) -> float | None:
        """Prometheus' histogram_quantile: linear within the bucket the q-th observation falls in; None without any.

        In the +Inf bucket the answer is the largest finite bound (all that is known is "more than that")."""
        total = self.count
        if total <= 0:
            return None
        rank, lower, below = q * total, 0.0, 0.0
        for le, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(le):
                    return lower
                inside = cumulative - below
                return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = le, cumulative
        return lower


@dataclasses.dataclass(frozen=True)
class StageSummary:
    address: str
    stage: str
    queue_depth: float | None
    occupancy: float | None
    chunk: Histogram
    request: Histogram
    images: float
    errors: dict[str, float]  # code → count, non-zero only


def summarize(address: str, samples: Iterable[Sample]) -> list[StageSummary]:
    """One summary per `stage` label among the sdmesh_* samples, in order of appearance."""
    by_stage: dict[str, list[Sample]] = {}
    for s in samples:
        if s.name.startswith(PREFIX) and "stage" in s.labels:
            by_stage.setdefault(s.labels["stage"], []).append(s)

    def value(of: list[Sample], name: str) -> float | None:
        return next((s.value for s in of if s.name == name), None)

    def histogram(of: list[Sample], name: str) -> Histogram:
        buckets = sorted(
            (float(s.labels["le"]), s.value) for s in of if s.name == f"{name}_bucket" and "le" in s.labels
        )
        return Histogram(tuple(buckets))

    return [
        StageSummary(
            address=address,
            stage=stage,
            queue_depth=value(of, "sdmesh_queue_depth"),
            # no batch yet (or never: the gateway): the gauge's 0 means nothing
            occupancy=value(of, "sdmesh_batch_occupancy") if value(of, "sdmesh_batch_size_count") else None,
            chunk=histogram(of, "sdmesh_chunk_seconds"),
            request=histogram(of, "sdmesh_request_seconds"),
            images=value(of, "sdmesh_images_served_total") or 0.0,
            errors={s.labels.get("code", "?"): s.value for s in of if s.name == "sdmesh_errors_total" and s.value},
        )
        for stage, of in by_stage.items()
    ]


# --- the table ----------------------------------------------------------------------

COLUMNS = ("ADDRESS", "STAGE", "QUEUE", "OCCUP", "CHUNK p50", "REQ p50", "REQ p99", "IMAGES", "IMG/S", "ERRORS")


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.1f}s" if value < 100 else f"{value:.0f}s"


def number(value: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def row(now: StageSummary, before: StageSummary | None, elapsed: float | None) -> list[str]:
    """The table row of one stage; `before`: its previous scrape, `elapsed` seconds earlier (None on the first)."""
    chunk = now.chunk.minus(before.chunk if before else None)
    request = now.request.minus(before.request if before else None)
    rate = None
    if before is not None and elapsed and now.images >= before.images:
        rate = (now.images - before.images) / elapsed
    errors = " ".join(f"{code}={n:.0f}" for code, n in sorted(now.errors.items())) or "-"
    return [
        now.address,
        now.stage,
        number(now.queue_depth),
        number(now.occupancy, "{:.2f}"),
        seconds(chunk.quantile(0.5)),
        seconds(request.quantile(0.5)),
        seconds(request.quantile(0.99)),
        number(now.images),
        number(rate, "{:.2f}"),
        errors,
    ]


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    right = {"QUEUE", "OCCUP", "CHUNK p50", "REQ p50", "REQ p99", "IMAGES", "IMG/S"}
    lines = [
        "  ".join(
            cell.rjust(w) if COLUMNS[i] in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))
        ).rstrip()
        for r in [COLUMNS, *rows]
    ]
    return "\n".join(lines)


class Top:
    """Scrapes the endpoints and renders the table, remembering the last scrape for rates and windows."""

    def __init__(self, addresses: Sequence[str], timeout: float = 5.0, context: ssl.SSLContext | None = None):
        self.addresses, self.timeout, self.context = list(addresses), timeout, context
        self._last: dict[tuple[str, str], tuple[float, StageSummary]] = {}

    def render(self) -> tuple[str, list[str]]:
        """(the table, one error message per endpoint that failed)."""
        rows, failures = [], []
        for address in self.addresses:
            try:
                samples = scrape(address, self.timeout, self.context)
            except ScrapeError as e:
                failures.append(str(e))
                continue
            now = time.monotonic()
            for summary in summarize(address, samples):
                key = (address, summary.stage)
                when, before = self._last.get(key, (None, None))
                rows.append(row(summary, before, now - when if when is not None else None))
                self._last[key] = (now, summary)
        return table(rows), failures


def main(args: argparse.Namespace) -> int:
    """`sdmesh top`: print the table once (--once) or every --interval seconds until Ctrl-C."""
    context = ssl_context(
        getattr(args, "tls_ca", None), getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    )
    top = Top(args.addresses, timeout=args.timeout, context=context)
    text, failures = top.render()
    if len(failures) == len(args.addresses):  # nothing answered: most likely a wrong address
        raise ScrapeError("; ".join(failures))
    if args.once:
        print(text)
        for failure in failures:
            print(f"sdmesh top: {failure}", file=sys.stderr)
        return 1 if failures else 0
    clear = "\033[H\033[J" if sys.stdout.isatty() else ""
    window = "since start"
    try:
        while True:
            stamp = time.strftime("%H:%M:%S")
            print(f"{clear}sdmesh top  {stamp}  every {args.interval:g}s; latencies {window} (Ctrl-C quits)")
            print(text)
            for failure in failures:
                print(f"  ! {failure}")
            sys.stdout.flush()
            time.sleep(args.interval)
            text, failures = top.render()
            window = "over the last interval"
    except KeyboardInterrupt:
        return 0
