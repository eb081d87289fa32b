"""Ray Data job: raw media files -> normalised rows -> Parquet shards + rejects + manifest.

One streaming pass; nothing decoded is ever materialised:
    list inputs on the driver (fsspec: local or gs://), put them in a seeded random order
    (`shuffled`: listing order is class order with class sub-folders)
    -> ray.data.from_items(rows)
    -> map_batches(decode_batch): read bytes + decode each row; a failure becomes a reject row
    -> write_datasink(ShardSink): rows routed by `split` to train/ val/ rejects/; with
       shards.write=fused (default) Ray fuses this into the decode tasks (one task reads,
       decodes and writes its batch), with =separate write tasks bundle rows per file
    -> manifest.json, written last (its presence means "finished").

Shape letters: S image/frame side, T audio samples, F frames.
Row: id str, label int64 (-1: none), label_name str, source str, split str ("train"/"val"),
     then per modality: image -> image uint8 (S, S, 3); audio -> audio int16 (T,) (or float32);
     video -> video uint8 (F, S, S, 3); audio+video -> video, audio, has_audio bool.
Reject row: source, id, reason, detail.

Reruns (pipeline/data/output.py): a run holds <output>/.hip-preprocess.lock (a second run
on the same output is refused before Ray starts), writes its shards into a new generation
<output>/gen-<run_id>/, switches manifest.json to it, and only then removes the older
generations. Until the switch readers see the previous dataset, complete; a failed or killed
run leaves it untouched, and the next run removes what the failed one wrote.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow
import ray
import ray.data

from pipeline import storage
from pipeline.config import config_hash, config_to_dict
from pipeline.data import isolate, layout, output, writer
from pipeline.data.config import PreprocessConfig
from pipeline.data.decode import Decoder, DecodeSpec, decode_batch
from pipeline.data.layout import FORMAT
from pipeline.data.listing import Listing, list_inputs
from pipeline.data.output import PreflightError
from pipeline.runtime import cluster_cpus, init_ray

ACCEPTED_COLUMNS = ["id", "label", "label_name", "source", "split"]
REJECT_COLUMNS = ["source", "id", "reason", "detail"]
# Small inputs are cut into at least this many decode tasks per worker (A/B medians: 500
# audio clips in 4 tasks ran at 180 rows/s, in 8 at 343 rows/s; docs/benchmarks.md).
TASKS_PER_WORKER = 2


# --------------------------------------------------------------------------------------
# Pre-flight: everything checkable before Ray starts
# --------------------------------------------------------------------------------------


@dataclass
class Plan:
    cfg: PreprocessConfig
    listing: Listing
    config_hash: str
    up_to_date: bool
    existing: dict[str, Any] | None  # the manifest already in the output, if any
    reason: str = ""  # why an existing dataset is rebuilt, for the log


def preflight(cfg: PreprocessConfig) -> Listing:
    """Validate locations and list inputs (no lock, no Ray). Raises PreflightError."""
    for key in ("input", "output"):
        if not getattr(cfg, key):
            raise PreflightError(f"--{key} is required")
    try:
        listing = list_inputs(cfg)
    except (ValueError, OSError) as e:
        raise PreflightError(str(e)) from None
    _check_output(cfg.input, cfg.output)
    return listing


def plan_run(cfg: PreprocessConfig, listing: Listing, *, overwrite: bool = False) -> Plan:
    """Skip or run, from the output's manifest (call it holding the output's lock)."""
    digest = config_hash(cfg, exclude=set(cfg.LOCATION_KEYS))
    existing = _read_manifest(cfg.output, overwrite)
    if existing is not None:
        same = (existing.get("config_hash"), existing.get("input_fingerprint")) == (
            digest, listing.fingerprint)
        if not same and not overwrite:
            raise PreflightError(
                f"{cfg.output} holds shards from a different config or inputs; "
                "pass --overwrite to replace them")
        if overwrite:
            return Plan(cfg, listing, digest, False, existing,
                        f"replacing {cfg.output} (--overwrite); its current shards stay "
                        "readable until the new ones are complete")
        try:  # same config and inputs: up to date unless the shards were damaged
            layout.validate(cfg.output, existing)
        except layout.DatasetError as e:
            return Plan(cfg, listing, digest, False, existing, f"rebuilding {cfg.output}: {e}")
        return Plan(cfg, listing, digest, True, existing)
    legacy = storage.exists(storage.join(cfg.output, output.LEGACY_MARKER))
    if not overwrite and not legacy:
        ours = [d for d in output.LEGACY if storage.exists(storage.join(cfg.output, d))]
        if ours:
            raise PreflightError(
                f"{cfg.output} has {', '.join(ours)}/ but no manifest.json or run marker "
                "(not written by hip preprocess?); choose another output or pass --overwrite")
    return Plan(cfg, listing, digest, False, None)


def _check_output(input_uri: str, output_uri: str) -> None:
    in_fs, in_path = storage.resolve(input_uri)
    out_fs, out_path = storage.resolve(output_uri)
    if in_fs.protocol == out_fs.protocol:
        a, b = in_path, out_path
        if storage.is_local(input_uri) and storage.is_local(output_uri):
            # A symlink must not hide an overlap (realpath also resolves missing tails).
            a, b = os.path.realpath(a), os.path.realpath(b)
        a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
        if a.startswith(b) or b.startswith(a):
            raise PreflightError(f"input {input_uri} and output {output_uri} overlap")
    probe = f"{out_path}/.hip-write-probe-{output.new_run_id()}"
    try:
        if out_fs.exists(out_path) and not out_fs.isdir(out_path):
            raise PreflightError(f"output {output_uri} is a file, not a folder")
        if storage.is_local(output_uri):  # object stores have no folders (and gcsfs'
            out_fs.makedirs(out_path, exist_ok=True)  # makedirs would create buckets)
        with out_fs.open(probe, "wb") as f:
            f.write(b"ok")
        out_fs.rm(probe)
    except PreflightError:
        raise
    except Exception as e:  # any failure here means "cannot write there"
        why = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise PreflightError(f"output {output_uri} is not writable ({why})") from None


def _read_manifest(out: str, overwrite: bool) -> dict[str, Any] | None:
    """The output's manifest, or None if there is none (or, with --overwrite, if it is
    unreadable: it names no data anyone can read)."""
    uri = storage.join(out, layout.MANIFEST)
    if not storage.exists(uri):
        return None
    try:
        return storage.read_json(uri)
    except (OSError, ValueError) as e:
        if overwrite:
            return None
        raise PreflightError(f"{uri} is unreadable ({e}); pass --overwrite to rebuild") from None


# --------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------


def _warn(message: str) -> None:
    print(f"hip: warning: {message}", file=sys.stderr)


def run_preprocess(
    cfg: PreprocessConfig, *, overwrite: bool = False, echo: Callable[[str], None] = print,
    warn: Callable[[str], None] = _warn,
) -> dict[str, Any]:
    """Pre-flight, the output's lock, then (unless up to date) the Ray Data job into a new
    generation, the manifest switch and the removal of older generations. Returns the
    manifest."""
    listing = preflight(cfg)
    run_id = output.new_run_id()
    with output.locked(cfg.output, run_id, warn):
        plan = plan_run(cfg, listing, overwrite=overwrite)
        live = output.live_generations(plan.existing)
        leftovers = output.remove_generations(cfg.output, keep=live)
        if leftovers:
            echo(f"removed {len(leftovers)} unfinished generation(s) of earlier runs: "
                 f"{', '.join(leftovers)}")
        if plan.up_to_date:
            echo(f"up to date: {cfg.output} (config and {listing.count} inputs unchanged; "
                 "--overwrite to rebuild)")
            return plan.existing
        if plan.reason:
            echo(plan.reason)
        init_ray()
        gen = output.generation(run_id)
        manifest = _execute(plan, run_id, gen, echo)
        storage.write_json(storage.join(cfg.output, layout.MANIFEST), manifest)  # the switch
        old = output.remove_generations(cfg.output, keep={gen}) + output.remove_legacy(
            cfg.output)
        echo(summary(manifest))
        if old:
            echo(f"  removed the previous shards: {', '.join(old)}")
        return manifest


def batch_rows(cfg: PreprocessConfig, row_bytes: int, count: int, workers: int,
               rows_per_file: int | None) -> int:
    """Files per decode task. Big batches amortise Ray's per-task cost; read.block_mb bounds
    big rows; small inputs get smaller batches so that every worker gets TASKS_PER_WORKER of
    them (with one task per worker, the slowest task leaves the other cores idle at the end
    of the job); a fused decode+write task's batch is one file, so rows_per_file bounds it."""
    by_mb = int(cfg.read.block_mb * 2**20 // max(row_bytes, 1))
    limits = [cfg.read.batch_size, by_mb, -(-count // (TASKS_PER_WORKER * workers))]
    if rows_per_file is not None:
        limits.append(rows_per_file)
    return max(1, min(limits))


def _execute(plan: Plan, run_id: str, gen: str, echo: Callable[[str], None]
             ) -> dict[str, Any]:
    cfg, listing = plan.cfg, plan.listing
    spec = DecodeSpec.from_config(cfg)
    workers = cfg.read.concurrency or max(1, int(cluster_cpus() // cfg.read.num_cpus))
    rows_per_file = _rows_per_file(cfg, spec)
    # Actor pools cannot be fused with the write; fused tasks' files hold one batch at most.
    fused = cfg.shards.write == "fused" and cfg.read.strategy == "tasks"
    batch = batch_rows(cfg, _row_bytes(spec), listing.count, workers,
                       rows_per_file if fused else None)
    root = storage.join(cfg.output, gen)
    echo(f"preprocessing {listing.count} {cfg.modality} files: {cfg.input} -> {root} "
         f"({workers} decode {cfg.read.strategy}, batch {batch}, {rows_per_file} rows/file, "
         f"{cfg.shards.write} write)")
    in_fs, _ = storage.resolve(cfg.input)
    tensors = list(spec.tensors)
    sink = writer.ShardSink(
        root, tensors={k: v for k, v in spec.tensors.items() if v[0]},
        rows_per_file=rows_per_file, compression=cfg.shards.compression,
        run_id=run_id, bundle_rows=not fused,
        columns={"train": ACCEPTED_COLUMNS + tensors, "val": ACCEPTED_COLUMNS + tensors,
                 layout.REJECTS: REJECT_COLUMNS})
    # One listing block per decode batch, and batch_size=None below (= one whole block per
    # call): with batch_size=B, Ray would bundle blocks of ~B rows into tasks of ~2B.
    with _op_reservation(cfg.read.op_reservation):
        rows = shuffled(listing.rows, cfg.shards.shuffle_seed)  # every file mixes classes
        ds = ray.data.from_items(rows, override_num_blocks=-(-listing.count // batch))
        if cfg.read.strategy == "actors":
            ds = ds.map_batches(
                Decoder, fn_constructor_args=(spec, in_fs), batch_size=None,
                **isolate.fault_remote_args(),
                batch_format="numpy", num_cpus=cfg.read.num_cpus,
                compute=ray.data.ActorPoolStrategy(size=workers))
        else:
            ds = ds.map_batches(
                decode_batch, fn_kwargs={"spec": spec, "fs": in_fs},
                **isolate.fault_remote_args(),
                batch_size=None, batch_format="numpy", num_cpus=cfg.read.num_cpus,
                compute=ray.data.TaskPoolStrategy(size=workers))
        start = time.perf_counter()
        if fused:
            # Same CPUs and task-pool size as the decode op: Ray fuses decode and write into
            # one task, so decoded rows go straight to Parquet without an object-store hop.
            ds.write_datasink(sink, ray_remote_args={"num_cpus": cfg.read.num_cpus},
                              concurrency=workers)
        else:
            # Writers get less than a decode worker's CPU: writing is cheap, and differing
            # resources keep Ray from fusing decode+write into tasks of a whole file's rows.
            ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.25})
        elapsed = time.perf_counter() - start
    result = sink.result
    for files in result["files"].values():  # manifest paths are relative to the output
        for f in files:
            f["path"] = f"{gen}/{f['path']}"
    return build_manifest(plan, spec, result, elapsed, gen)


@contextmanager
def _op_reservation(enabled: bool):
    """Datasets copy the current DataContext when they are created: set it first, restore it
    after the job so a training run in this process gets Ray's defaults."""

    ctx = ray.data.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = enabled
    try:
        yield
    finally:
        ctx.op_resource_reservation_enabled = saved


def shuffled(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The listing's rows in a seeded random order: sorted by sha256("<seed>:<id>").

    The listing is sorted by path, i.e. by class with ImageFolder inputs; written in that
    order, each shard file would hold one or two classes and training batches (which shuffle
    within a bounded buffer) would be nearly one class. Each row's place depends only on the
    seed and its id (a hash of its relative path), so a rerun over the same inputs writes the
    same order, and a new file does not reorder the others."""
    def key(row: dict[str, Any]) -> bytes:
        return hashlib.sha256(f"{seed}:{row['id']}".encode()).digest()

    return sorted(rows, key=key)


def _rows_per_file(cfg: PreprocessConfig, spec: DecodeSpec) -> int:
    """Rows per shard file from the MB target (uncompressed) and the row bound."""
    row_bytes = _row_bytes(spec)
    limits = [cfg.shards.max_rows_per_file or 1 << 40]
    if cfg.shards.target_mb_per_file:
        limits.append(int(cfg.shards.target_mb_per_file * 2**20 // row_bytes))
    return max(1, min(limits))


def _row_bytes(spec: DecodeSpec) -> int:
    """Decoded bytes of one row (tensors + ~200 bytes of text columns)."""
    return 200 + sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in spec.tensors.values())


def build_manifest(
    plan: Plan, spec: DecodeSpec, result: dict[str, Any], elapsed: float, gen: str
) -> dict[str, Any]:
    cfg, listing = plan.cfg, plan.listing
    counts = result["counts"]
    split_rows = {s: sum(f["rows"] for f in result["files"][s]) for s in layout.SPLITS}
    rejected = sum(f["rows"] for f in result["files"][layout.REJECTS])
    accepted = sum(split_rows.values())
    if accepted + rejected != listing.count:  # a lost or duplicated row is a bug: no manifest
        raise RuntimeError(f"{listing.count} inputs but {accepted} accepted + {rejected} "
                           "rejected were written")
    per_label: dict[str, int] = {}
    for s in layout.SPLITS:
        for name, n in counts[s].items():
            per_label[name or "(unlabeled)"] = per_label.get(name or "(unlabeled)", 0) + n
    columns = {k: {"shape": list(shape), "dtype": d} for k, (shape, d) in spec.tensors.items()}
    return {
        "format": FORMAT, "modality": cfg.modality,
        "inputs": listing.count, "accepted": accepted, "rejected": rejected,
        "ignored_files": listing.ignored, "labels_unmatched": listing.labels_unmatched,
        "splits": split_rows,
        "classes": listing.classes,
        "label_counts": dict(sorted(per_label.items())),
        "split_label_counts": {s: {k or "(unlabeled)": v for k, v in sorted(counts[s].items())}
                               for s in layout.SPLITS},
        "rejects_by_reason": dict(sorted(counts[layout.REJECTS].items())),
        "columns": columns,  # tensors: raw C-order bytes per row (codec.tensor_to_arrow)
        "schema": {"rows": result["schemas"].get("train") or result["schemas"].get("val"),
                   "rejects": result["schemas"].get(layout.REJECTS)},
        "generation": gen,  # the folder of this run's shards
        "files": result["files"],  # paths relative to the output: <generation>/<split>/...
        "shuffle_seed": cfg.shards.shuffle_seed,  # rows written in the order of shuffled()
        "config": config_to_dict(cfg), "config_hash": plan.config_hash,
        "input_fingerprint": listing.fingerprint,
        "created": output.now(), "elapsed_s": round(elapsed, 3),
        "rows_per_s": round(listing.count / elapsed, 2) if elapsed > 0 else None,
        "versions": _versions(),
    }


def summary(m: dict[str, Any]) -> str:
    """The end-of-job report: counts, rejects by reason, speed, where the shards are."""
    out = m["config"]["output"]
    reasons = ", ".join(f"{k} {v}" for k, v in m["rejects_by_reason"].items()) or "none"
    files = ", ".join(f"{storage.join(out, m['generation'], s)}/ ({len(m['files'][s])} files)"
                      for s in (*layout.SPLITS, layout.REJECTS))
    shapes = ", ".join(f"{k} {c['dtype']}{tuple(c['shape'])}" for k, c in m["columns"].items())
    return "\n".join([
        f"done: {m['inputs']} inputs -> {m['accepted']} accepted (train {m['splits']['train']}, "
        f"val {m['splits']['val']}), {m['rejected']} rejected in {m['elapsed_s']:.1f} s "
        f"({m['rows_per_s']} rows/s)",
        f"  rejects: {reasons}",
        f"  rows: {shapes}; {len(m['classes'])} classes",
        f"  shards: {files}",
        f"  manifest: {storage.join(out, layout.MANIFEST)}",
    ])


def _versions() -> dict[str, str]:
    return {"ray": ray.__version__, "pyarrow": pyarrow.__version__, "numpy": np.__version__}
