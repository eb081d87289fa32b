"""Inputs on the driver, before Ray: files, labels, ids, splits and a fingerprint.

Every listed input ends as exactly one row: media files become decode work; a FIFO, device,
socket or dangling symlink with a media extension (reason not_a_file) and a file over
read.max_file_mb (too_large) become reject rows here, before anything is read.

File names are any bytes (Linux allows names that are not UTF-8; Arrow strings must be):
`escape_path` turns a name into a UTF-8 string losslessly (undecodable bytes as \\xHH,
backslashes doubled; a valid UTF-8 name without backslashes is unchanged) and
`unescape_path` gives the name back for reading.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline import storage
from pipeline.data import media
from pipeline.data.config import PreprocessConfig
from pipeline.data.media import errors as reasons


def escape_path(name: str) -> str:
    """A file name (str from the OS, possibly with surrogate-escaped bytes) -> valid UTF-8."""
    raw = name.encode("utf-8", "surrogateescape").replace(b"\\", b"\\\\")
    return raw.decode("utf-8", "backslashreplace")


def unescape_path(text: str) -> str:
    """Inverse of escape_path: the name to open (surrogate-escaped str, as os.listdir gives)."""
    if "\\" not in text:
        return text
    out, i, raw = bytearray(), 0, text.encode("utf-8")
    while i < len(raw):
        if raw[i:i + 2] == b"\\\\":
            out += b"\\"
            i += 2
        elif raw[i:i + 2] == b"\\x":
            out.append(int(raw[i + 2:i + 4], 16))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return bytes(out).decode("utf-8", "surrogateescape")


@dataclass
class Listing:
    # id, label, label_name, source, path (escape_path'd), split, size, and reject / detail
    # ("" unless the listing already knows the input cannot be decoded) per input file
    rows: list[dict[str, Any]]
    classes: list[str]  # label -> name
    ignored: int  # files without the modality's extensions
    labels_unmatched: int  # CSV rows naming no input file
    fingerprint: str  # sha256 over input root, relative paths, sizes, mtimes, labels CSV

    @property
    def count(self) -> int:
        return len(self.rows)


def list_inputs(cfg: PreprocessConfig) -> Listing:
    """Media files under cfg.input (hidden files skipped) with labels, ids and splits.

    id = sha256 of the path relative to the input root, so ids and splits survive moving
    the dataset (local disk <-> bucket). Labels: `--labels` CSV, else the first sub-folder
    (ImageFolder), else -1. Raises ValueError with a one-line message.
    """
    fs, root = storage.resolve(cfg.input)
    if not fs.exists(root):
        raise ValueError(f"input {cfg.input} does not exist")
    if not fs.isdir(root):
        raise ValueError(f"input {cfg.input} is not a folder")
    kind = "video" if cfg.modality == "audio+video" else cfg.modality
    exts = media.EXTENSIONS[kind]
    files, ignored = [], 0
    for path, info in sorted(fs.find(root, detail=True, withdirs=False).items()):
        rel = posixpath.relpath(path, root)
        if info.get("type") == "directory" or any(p.startswith(".") for p in rel.split("/")):
            continue
        if posixpath.splitext(rel)[1].lower() not in exts:
            ignored += 1
            continue
        files.append((rel, path, info))
    if not files:
        raise ValueError(f"no {kind} files ({' '.join(sorted(exts))}) under {cfg.input}")
    rels = [rel for rel, _, _ in files]
    if cfg.labels:
        names, unmatched, csv_digest = _labels_from_csv(cfg.labels, fs, root, rels)
    else:
        names = {rel: escape_path(rel.split("/")[0]) for rel in rels if "/" in rel}
        unmatched, csv_digest = 0, ""
    classes = sorted(set(names.values()), key=_class_key)
    index = {name: i for i, name in enumerate(classes)}
    scheme = "" if storage.is_local(cfg.input) else cfg.input.split("://")[0] + "://"
    rows, stamps = [], []
    for rel, path, info in files:
        rid = hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        val = int(rid[:8], 16) / 2**32 < cfg.split.val_fraction
        name = names.get(rel, "")
        reject, detail = _listing_reject(info, cfg.read.max_file_mb)
        rows.append({"id": rid, "label": index.get(name, -1), "label_name": name,
                     "source": scheme + escape_path(path), "path": escape_path(path),
                     "split": "val" if val else "train", "size": int(info.get("size") or 0),
                     "reject": reject, "detail": detail})
        stamp = next((info[k] for k in ("mtime", "updated", "LastModified", "generation",
                                        "etag") if info.get(k) is not None), "")
        stamps.append([rel, info.get("size"), str(stamp)])
    blob = json.dumps([scheme + root, stamps, csv_digest], sort_keys=True)
    return Listing(rows, classes, ignored, unmatched, hashlib.sha256(blob.encode()).hexdigest())


def _labels_from_csv(
    uri: str, fs: fsspec.AbstractFileSystem, root: str, rels: list[str]
) -> tuple[dict[str, str], int, str]:
    """CSV `path,label` (optional header; paths relative to the input root, or absolute /
    URIs inside it) -> ({relative path: label name}, unmatched rows, content sha256)."""
    try:
        lfs, lpath = storage.resolve(uri)
        text = lfs.cat_file(lpath).decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read labels CSV {uri}: {e}") from None
    names: dict[str, str] = {}
    for line, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or (line == 1 and [c.strip().lower() for c in row] == ["path", "label"]):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(f"labels CSV {uri} line {line}: expected `path,label`, got {row}")
        path, name = row[0].strip(), row[1].strip()
        if "://" in path or os.path.isabs(path):
            path = posixpath.relpath(storage.resolve(path)[1], root)
        rel = posixpath.normpath(path)
        if names.setdefault(rel, name) != name:
            raise ValueError(f"labels CSV {uri} line {line}: {rel} labelled twice")
    known = set(rels)
    matched = {rel: name for rel, name in names.items() if rel in known}
    if not matched:
        raise ValueError(f"labels CSV {uri} names none of the {len(rels)} input files "
                         "(paths must be relative to --input)")
    return matched, len(names) - len(matched), hashlib.sha256(text.encode()).hexdigest()


def _listing_reject(info: dict[str, Any], max_file_mb: float) -> tuple[str, str]:
    """(reason, detail) of an input the listing already knows cannot be decoded, else ("", "").
    Reading a FIFO blocks forever and a device never ends: only regular files are read."""
    if info.get("type") != "file":
        what = "a dangling or special symlink" if info.get("islink") else "not a regular file"
        return reasons.REASON_NOT_A_FILE, f"{what} (FIFO, device, socket or broken link)"
    size = int(info.get("size") or 0)
    if size > max_file_mb * 2**20:
        return reasons.REASON_TOO_LARGE, (f"{size / 2**20:.1f} MB > read.max_file_mb="
                                          f"{max_file_mb:g}")
    return "", ""


def _class_key(name: str) -> tuple[int, int, str]:
    """Numeric class names sort as numbers ("2" < "10"), so "0".."K-1" keep their value.
    Only ASCII digits count: "²" or "٣" are digits to str.isdigit but not to int()."""
    numeric = name.isascii() and name.isdigit()
    return (0, int(name), "") if numeric else (1, 0, name)

