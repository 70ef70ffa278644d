"""Where the CSV files are and their bytes: paths and URIs, raw blocks, sha256, gzip, whole-line pieces.

The bottom of the CSV reader (:mod:`mnist_ray.data.csv_reader`): everything here is about
bytes and lines, nothing about columns or values (:mod:`mnist_ray.data.csv_rules`).
Memory stays bounded whatever a file holds: blocks of 1 MiB, pieces of whole lines of about
a chunk, a line longer than MAX_LINE_BYTES cut short.
"""

from __future__ import annotations

import glob
import hashlib
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs

from mnist_ray.data.schema import DataValidationError
from mnist_ray.errors import MissingInput

CSV_SUFFIXES = (".csv", ".csv.gz")
READ_BLOCK_BYTES = 1 << 20
# A longer line is not a digit row (the longest valid one is ~3 KB); it is rejected unread.
MAX_LINE_BYTES = 1 << 20
# Of a line too long to read, this much is kept to show in its reject.
LONG_LINE_PREFIX_BYTES = 1 << 14


def resolve_csv_paths(specs: list[str]) -> list[str]:
    """Expand files, directories and globs into a sorted list of CSV paths.

    Local paths become absolute (Ray tasks may run in another working
    directory). URIs (``s3://``, ``gs://``, ...) are passed to pyarrow's
    filesystems; a URI that names a directory is listed. Raises
    ``MissingInput`` naming the spec that matched nothing.
    """
    paths: list[str] = []
    for spec in specs:
        if "://" in spec:
            paths.extend(_list_uri(spec))
            continue
        if any(ch in spec for ch in "*?["):
            matches = [
                m for m in glob.glob(spec, recursive=True) if os.path.isfile(m) and is_csv_name(m)
            ]
        elif os.path.isdir(spec):
            matches = [
                os.path.join(root, name)
                for root, _, names in os.walk(spec)
                for name in names
                if is_csv_name(name)
            ]
        elif os.path.isfile(spec):
            matches = [spec]
        else:
            raise MissingInput(f"{spec}: no such file or directory")
        if not matches:
            raise MissingInput(f"{spec}: matched no .csv or .csv.gz file")
        paths.extend(os.path.abspath(m) for m in matches)
    return sorted(dict.fromkeys(paths))


def is_csv_name(path: str) -> bool:
    """``.csv`` or ``.csv.gz``, in any case: a nightly drop of ``DIGITS.CSV`` must not be skipped unseen."""
    return path.lower().endswith(CSV_SUFFIXES)


def _list_uri(uri: str) -> list[str]:
    fs, path = pafs.FileSystem.from_uri(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type != pafs.FileType.Directory:
        raise MissingInput(f"{uri}: no such file or directory")
    scheme = uri.split("://", 1)[0]
    selector = pafs.FileSelector(path, recursive=True)
    found = [
        f"{scheme}://{i.path}"
        for i in fs.get_file_info(selector)
        if i.type == pafs.FileType.File and is_csv_name(i.path)
    ]
    if not found:
        raise MissingInput(f"{uri}: matched no .csv or .csv.gz file")
    return found


def raw_blocks(path: str) -> Iterator[bytes]:
    """The stored bytes of a local path or URI (still compressed), in blocks of up to 1 MiB."""
    if "://" in path:
        fs, inner = pafs.FileSystem.from_uri(path)
    else:
        fs, inner = pafs.LocalFileSystem(), path
    with fs.open_input_stream(inner, compression=None) as stream:
        while block := stream.read(READ_BLOCK_BYTES):
            yield block


def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of the stored file, as ``sha256sum`` prints it."""
    digest, size = hashlib.sha256(), 0
    for block in raw_blocks(path):
        digest.update(block)
        size += len(block)
    return size, digest.hexdigest()



def gunzip(blocks: Iterator[bytes], source: str) -> Iterator[bytes]:
    """Decompress a gzip stream (several members allowed) in bounded pieces.

    Raises ``DataValidationError`` for corrupt or truncated data, after yielding
    everything before the damage.
    """
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    in_member = False
    for block in blocks:
        pending = block
        while pending:
            in_member = True
            try:
                # Bounded output: a small block of a "zip bomb" must not expand all at once.
                out = inflater.decompress(pending, READ_BLOCK_BYTES)
            except zlib.error as exc:
                raise DataValidationError(f"is not valid gzip data ({exc})", source=source) from None
            if out:
                yield out
            if inflater.eof:
                pending = inflater.unused_data
                inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                in_member = False
            else:
                pending = inflater.unconsumed_tail
    if in_member:
        out = inflater.flush()
        if out:
            yield out
        raise DataValidationError("gzip data ends early: the file is truncated", source=source)


def line_chunks(blocks: Iterator[bytes], chunk_bytes: int) -> Iterator[tuple[int, bytes | LongLine]]:
    """Regroup byte blocks into ``(first line number, whole lines)`` pieces of about ``chunk_bytes``.

    A line still unfinished after MAX_LINE_BYTES comes out alone as a :class:`LongLine`
    and the rest of it is skipped, so memory stays bounded (chunk_bytes + a block +
    MAX_LINE_BYTES) even for a file without line ends. The last piece may lack a final ``\\n``.
    """
    line = 1
    carry = bytearray()
    skipping = False  # inside a long line, dropping bytes up to its end
    try:
        for block in blocks:
            if skipping:
                end = block.find(b"\n")
                if end < 0:
                    continue
                block, skipping, line = block[end + 1 :], False, line + 1
            carry += block
            while cut := _chunk_end(carry, chunk_bytes):
                piece = bytes(carry[:cut])
                del carry[:cut]
                yield line, piece
                line += piece.count(b"\n")
            tail = carry.rfind(b"\n") + 1
            if len(carry) - tail > MAX_LINE_BYTES:
                if tail:
                    piece = bytes(carry[:tail])
                    yield line, piece
                    line += piece.count(b"\n")
                yield line, LongLine(line, bytes(carry[tail : tail + LONG_LINE_PREFIX_BYTES]))
                carry.clear()
                skipping = True
    except DataValidationError:
        # The stream broke (a damaged gzip file): the whole lines read before the damage still count.
        if not skipping and (whole := carry.rfind(b"\n") + 1):
            yield line, bytes(carry[:whole])
        raise
    if carry and not skipping:
        yield line, bytes(carry)


def _chunk_end(carry: bytearray, chunk_bytes: int) -> int:
    """Where the next piece ends: after the last whole line within ``chunk_bytes``; 0 if not yet."""
    if len(carry) < chunk_bytes:
        return 0
    end = carry.rfind(b"\n", 0, chunk_bytes)
    if end < 0:  # one line longer than a chunk: the piece is that line
        end = carry.find(b"\n", chunk_bytes)
    return end + 1



@dataclass(frozen=True)
class LongLine:
    """A line longer than MAX_LINE_BYTES: rejected without being parsed."""

    line: int
    prefix: bytes
