"""The ``.npz`` file format of a :class:`~attnlab.trace.CaptionTrace` and its defensive reader.

A trace file holds one ``.npy`` member per array plus a JSON ``header`` and carries
one integer :data:`TRACE_VERSION`. Reading is defensive: only the members listed in
:data:`MEMBERS` are read, each member's shape, dtype and size are taken from its zip
and ``.npy`` headers and checked against the others and against :data:`LIMITS` and a
memory budget (:data:`MAX_TRACE_BYTES`) *before* anything is decompressed, and
damaged values (a string version, an infinite grid, token ids beyond the vocabulary,
NaN attention, ...) are refused with one line.

Upgrade path: a file of an older version is read with the members and header keys
that version had, then brought up to date by the ``_UPGRADES`` steps, one per
version (``_v1_to_v2`` fills ``prefix_tokens = 0`` and ``prefix_share = None``).
To add a field: add it to :class:`~attnlab.trace.CaptionTrace` with a default, to
:data:`MEMBERS` (arrays, with the version that introduced it) or ``_HEADER_KEYS``
(plain values), bump :data:`TRACE_VERSION`, add the step that fills the default for
older files, and pass it on in :func:`load_fields`. Files of a newer version are
refused ("upgrade attnlab").

Versions: 1 (attnlab 0.1: logits required; ``prefix_tokens``/``prefix_share``
optional, written only by the first captioner-seam builds); 2 (``prefix_tokens``
always in the header, ``prefix_share`` and ``logits`` optional); 3 (``views`` and
``share_kinds`` in the header, members ``view_maps`` and ``key_shares``: see
:mod:`attnlab.trace_views`; ``prefix_share`` is stored as ``key_shares["prefix"]``).

Nothing here builds a trace: :meth:`CaptionTrace.load` passes :func:`load_fields`
to the class, so this module never imports it (no import circle).
"""

from __future__ import annotations

import json
import math
import os
import stat
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from . import trace_views
from .errors import AttnlabError
from .fileio import atomic_write

CaptionTrace = Any  # an attnlab.trace.CaptionTrace (not imported: the trace imports this module)

TRACE_FORMAT = "attnlab-trace"
TRACE_VERSION = 3

# member -> (dtype kinds allowed, the version that introduced it)
MEMBERS: dict[str, tuple[str, int]] = {
    "header": ("U", 1),
    "token_ids": ("iu", 1),
    "logits": ("f", 1),
    "image": ("u", 1),
    "cross_attention": ("f", 1),
    "encoder_self_attention": ("f", 1),
    "decoder_self_attention": ("f", 1),
    "prefix_share": ("f", 1),  # written by some version-1 files already (see _v1_to_v2)
    "view_maps": ("f", 3),  # the views after the first, joined: (layers, heads, steps, sum of h * w)
    "key_shares": ("f", 3),  # (kinds, layers, heads, steps), kinds in the header's share_kinds
}
_REQUIRED = {1: ("header", "token_ids", "logits", "image"), 2: ("header", "token_ids", "image"), 3: ("header", "token_ids", "image")}
_V2_KEYS = ("words", "grid", "model_name", "caption", "prefix_tokens")
_HEADER_KEYS = {1: ("words", "grid", "model_name", "caption"), 2: _V2_KEYS, 3: (*_V2_KEYS, "views", "share_kinds")}

# sanity bounds on what a trace file may declare (far above any real captioner)
LIMITS = {
    "steps": 4096,  # decoding steps
    "vocab": 2_000_000,  # width of the logits
    "layers": 512,
    "heads": 512,
    "grid": 4096,  # rows or columns of the patch grid
    "prefix_tokens": 4096,
    "image": 16384,  # pixels per side of the stored image
}
MAX_TRACE_BYTES = 1024**3  # all arrays together, uncompressed (CaptionTrace.load(max_bytes=...) to allow more)
MAX_HEADER_BYTES = 16 * 1024**2  # the JSON header (words, caption, meta)
_NPY_HEADER_MAX = 10_000  # numpy's own limit for a .npy header


def save(trace: CaptionTrace, path: str | os.PathLike) -> Path:
    """Write ``trace`` to a ``.npz`` file atomically (``.npz`` appended when missing); returns the path."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
    try:
        arrays = _npz_members(trace)
    except AttnlabError as exc:
        raise AttnlabError(f"cannot save the trace to {path}: {exc}") from None
    atomic_write(path, lambda fh: np.savez_compressed(fh, **arrays))
    return path


def load_fields(path: str | os.PathLike, *, max_bytes: int = MAX_TRACE_BYTES) -> dict[str, Any]:
    """The checked, upgraded contents of a trace file as :class:`CaptionTrace` keyword arguments."""
    path = Path(path)
    with _open_trace(path) as zf:
        header, version, members = _read_header(path, zf)
        shapes = {name: _peek(path, zf, info) for name, info in members.items() if name != "header"}
        _check_shapes(path, header, version, shapes, max_bytes)
        arrays = {name: _read_member(path, zf, members[name]) for name in shapes}
    header, arrays = _upgrade(header, arrays, version)
    _check_values(path, arrays)
    try:
        views = trace_views.views_from_header(header)
        maps = trace_views.unpack(views, arrays.get("cross_attention"), arrays.get("view_maps"))
        shares = dict(zip(trace_views.share_kinds(header), arrays.get("key_shares", ())))
        return dict(
            token_ids=arrays["token_ids"],
            words=header["words"],
            logits=arrays.get("logits"),
            cross_attention=None if maps else arrays.get("cross_attention"),
            grid=tuple(header["grid"]),
            image=arrays["image"],
            model_name=header["model_name"],
            caption=header["caption"],
            encoder_self_attention=arrays.get("encoder_self_attention"),
            decoder_self_attention=arrays.get("decoder_self_attention"),
            meta=header.get("meta", {}),
            prefix_tokens=header["prefix_tokens"],
            prefix_share=arrays.get("prefix_share"),
            word_starts=header.get("word_starts"),
            views=views,
            view_maps=maps,
            key_shares=shares,
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise damaged(path, f"{type(exc).__name__}: {exc}") from None


def _npz_members(trace: CaptionTrace) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` file, the JSON header first; refuses what :func:`load_fields` would."""
    bad = trace.nonfinite()
    if bad:
        raise AttnlabError(f"{', '.join(bad)} hold NaN or infinite values (the model's weights may be broken)")
    problem = _text_problem(trace.words, trace.caption, trace.model_name) or word_probabilities_problem(trace.meta, trace.steps)
    if problem:
        raise AttnlabError(problem)
    header = {
        "format": TRACE_FORMAT,
        "version": TRACE_VERSION,
        "words": trace.words,
        "grid": list(trace.grid),
        "model_name": trace.model_name,
        "caption": trace.caption,
        "prefix_tokens": trace.prefix_tokens,
        "meta": trace.meta,
        **trace_views.views_header(trace.views, trace.key_shares),
    }
    if trace.word_starts is not None:
        header["word_starts"] = trace.word_starts.tolist()
    try:
        text = json.dumps(header, default=_json_value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise AttnlabError(f"meta holds a value JSON cannot store ({exc}); use numbers, strings, lists and dicts") from None
    arrays: dict[str, np.ndarray] = {"header": np.array(text), "token_ids": trace.token_ids, "image": trace.image}
    several = len(trace.views) > 1 and trace.num_layers
    if trace.num_layers:
        arrays["cross_attention"] = trace.view_attention(0)
    for name in ("logits", "encoder_self_attention", "decoder_self_attention"):
        value = getattr(trace, name)
        if value is not None:
            arrays[name] = value
    arrays.update(trace_views.pack(trace.view_maps if several else None, trace.key_shares))  # prefix_share: key_shares["prefix"]
    return arrays


def write_npz(trace: CaptionTrace, fh: BinaryIO) -> None:
    """Write ``trace`` in the ``.npz`` format of :meth:`CaptionTrace.save` to an open binary file."""
    np.savez_compressed(fh, **_npz_members(trace))


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a trace file (words, grid, caption, meta, ...) without reading its arrays."""
    path = Path(path)
    with _open_trace(path) as zf:
        header, _, _ = _read_header(path, zf)
    return header


# ====================================================================== reading, defensively
def _json_value(value: Any) -> Any:
    """``json.dumps`` fallback: NumPy numbers/arrays and paths become plain values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"a {type(value).__name__}")


def logits_problem(logits: np.ndarray) -> str | None:
    """Why ``logits`` (steps, vocab) give no probabilities, or None (-inf alone is a masked token)."""
    if np.isnan(logits).any() or np.isposinf(logits).any():
        return "logits hold NaN or +inf"
    if logits.size and np.isneginf(logits).all(axis=1).any():  # (steps,): softmax of such a row is NaN
        return f"the logits of step {int(np.flatnonzero(np.isneginf(logits).all(axis=1))[0])} are all -inf (no token possible)"
    return None


def _text_problem(words: list[str], caption: str, model_name: str) -> str | None:
    """Why the words, caption or model name cannot be written as UTF-8 (a lone surrogate), or None."""
    for what, text in [*((f"word {i}", w) for i, w in enumerate(words)), ("caption", caption), ("model_name", model_name)]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return f"{what} {ascii(text)[:60]} is not valid Unicode text (a lone surrogate); use real characters"
    return None


def word_probabilities_problem(meta: dict[str, Any], steps: int) -> str | None:
    """Why ``meta["word_probabilities"]`` (written by :meth:`CaptionTrace.by_word`) is not one
    probability from 0 to 1 per word, or None."""
    if "word_probabilities" not in meta:
        return None
    probs = meta["word_probabilities"]
    ok = isinstance(probs, list) and len(probs) == steps
    ok = ok and all(type(p) in (int, float) and math.isfinite(p) and 0.0 <= p <= 1.0 for p in probs)
    if ok:
        return None
    return f"meta['word_probabilities'] must be one probability from 0 to 1 per word ({steps}), not {ascii(probs)[:60]}: remove it or caption again"


def damaged(path: Path, reason: str) -> AttnlabError:
    """The one-line error for a trace file whose contents fail a check."""
    reason = " ".join(reason.split())[:300]
    return AttnlabError(f"{path} is a damaged attnlab trace ({reason}); caption the image again to write a new one")


def _open_trace(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise AttnlabError(f"no trace file at {path}")
    if not stat.S_ISREG(path.stat().st_mode):
        raise AttnlabError(f"{path} is not a regular file: pass a .npz trace written by CaptionTrace.save")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise AttnlabError(f"{path} is not an attnlab trace file ({type(exc).__name__}); save one with CaptionTrace.save") from None


def _read_header(path: Path, zf: zipfile.ZipFile) -> tuple[dict[str, Any], int, dict[str, zipfile.ZipInfo]]:
    """The checked header, the file's version and its members (name -> zip entry)."""
    infos = zf.infolist()
    names = [i.filename for i in infos]
    if "header.npy" not in names:
        raise AttnlabError(f"{path} is not an attnlab trace file (no header); save one with CaptionTrace.save")
    if len(set(names)) != len(names):
        raise damaged(path, "a member appears twice")
    members = {}
    for info in infos:
        name = info.filename[:-4] if info.filename.endswith(".npy") else None
        if name not in MEMBERS:
            raise damaged(path, f"unknown member {info.filename[:60]!r}")
        members[name] = info
    shape, dtype, _ = _peek(path, zf, members["header"])
    if shape != () or dtype.kind != "U" or dtype.itemsize > MAX_HEADER_BYTES:
        raise damaged(path, "the header is not one JSON string of reasonable size")
    try:
        text = str(_read_member(path, zf, members["header"]))
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise damaged(path, f"header: {type(exc).__name__}") from None
    if not isinstance(header, dict) or header.get("format") != TRACE_FORMAT:
        raise AttnlabError(f"{path} is not an attnlab trace file")
    version = header.get("version")
    if type(version) is not int or version < 1:
        raise damaged(path, f"version {version!r} is not a whole number from 1")
    if version > TRACE_VERSION:
        raise AttnlabError(f"{path} was written by a newer attnlab (trace version {version}); upgrade attnlab")
    for name in members:
        if MEMBERS[name][1] > version:
            raise damaged(path, f"member {name} did not exist in version {version}")
    for name in _REQUIRED[version]:
        if name not in members:
            raise damaged(path, f"member {name} is missing")
    _check_header(path, header, version)
    return header, version, members


def _whole(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _check_header(path: Path, header: dict[str, Any], version: int) -> None:
    for key in _HEADER_KEYS[version]:
        if key not in header:
            raise damaged(path, f"the header has no {key!r}")
    words = header["words"]
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words) or len(words) > LIMITS["steps"]:
        raise damaged(path, "words must be a list of strings")
    grid = header["grid"]
    if not isinstance(grid, list) or len(grid) != 2 or not all(_whole(g, 1, LIMITS["grid"]) for g in grid):
        shown = grid if not isinstance(grid, list) else [g if not isinstance(g, float) or math.isfinite(g) else str(g) for g in grid[:3]]
        raise damaged(path, f"grid {shown!r} is not two whole numbers from 1 to {LIMITS['grid']}")
    for key in ("model_name", "caption"):
        if not isinstance(header[key], str):
            raise damaged(path, f"{key} is not a string")
    if not isinstance(header.get("meta", {}), dict):
        raise damaged(path, "meta is not a dict")
    if (version >= 2 or "prefix_tokens" in header) and not _whole(header["prefix_tokens"], 0, LIMITS["prefix_tokens"]):
        raise damaged(path, f"prefix_tokens {header['prefix_tokens']!r} is not a whole number from 0 to {LIMITS['prefix_tokens']}")
    starts = header.get("word_starts")  # optional in version 2 (added without a version bump: older files lack it)
    if starts is not None and (not isinstance(starts, list) or len(starts) != len(words) or not all(isinstance(b, bool) for b in starts)):
        raise damaged(path, "word_starts must be one true/false per word")
    problem = _text_problem(words, header["caption"], header["model_name"]) or word_probabilities_problem(header.get("meta", {}), len(words))
    if problem:
        raise damaged(path, problem)
    try:
        views = trace_views.views_from_header(header)
        trace_views.share_kinds(header)
    except ValueError as exc:
        raise damaged(path, str(exc)) from None
    if views is not None and list(views[0].grid) != grid:
        raise damaged(path, f"grid {grid} is not the first view's grid {list(views[0].grid)}")


def _peek(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and byte size of a member, from its ``.npy`` header only (a few bytes decompressed).

    The size the zip entry declares must be exactly the ``.npy`` header plus the array:
    no hidden data, no bomb behind a small shape.
    """
    try:
        with zf.open(info) as fh:
            major, _ = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh, max_header_size=_NPY_HEADER_MAX)
            offset = fh.tell()
    except Exception as exc:  # zipfile, numpy and zlib raise their own types
        raise damaged(path, f"member {info.filename}: {type(exc).__name__}") from None
    name = info.filename[:-4]
    if dtype.hasobject or dtype.kind not in MEMBERS[name][0] or dtype.fields is not None or dtype.subdtype is not None:
        raise damaged(path, f"member {name} has dtype {dtype}")
    nbytes = math.prod(shape) * dtype.itemsize
    if info.file_size != offset + nbytes:
        raise damaged(path, f"member {name} declares {info.file_size} bytes, its array of shape {shape} needs {offset + nbytes}")
    return tuple(shape), dtype, nbytes


def _read_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    try:
        with zf.open(info) as fh:
            return np.lib.format.read_array(fh, allow_pickle=False, max_header_size=_NPY_HEADER_MAX)
    except Exception as exc:  # a bad CRC, a cut stream, ...
        raise damaged(path, f"member {info.filename}: {type(exc).__name__}: {exc}") from None


def _check_shapes(path: Path, header: dict[str, Any], version: int, shapes: dict[str, tuple], max_bytes: int) -> None:
    """Every declared shape against the header and the others, before any array is read."""
    steps = len(header["words"])
    rows, cols = header["grid"]
    prefix = header.get("prefix_tokens", 0)

    def shape(name: str) -> tuple[int, ...] | None:
        return shapes[name][0] if name in shapes else None

    def need(name: str, ok: bool, want: str) -> None:
        if not ok:
            raise damaged(path, f"{name} has shape {shape(name)}, expected {want}")

    need("token_ids", shape("token_ids") == (steps,), f"({steps},): one id per word")
    if "logits" in shapes:
        s = shape("logits")
        need("logits", len(s) == 2 and s[0] == steps and 1 <= s[1] <= LIMITS["vocab"], f"({steps}, vocab) with vocab up to {LIMITS['vocab']}")
    s = shape("image")
    need("image", len(s) == 3 and s[2] == 3 and all(1 <= v <= LIMITS["image"] for v in s[:2]), f"(height, width, 3), sides up to {LIMITS['image']}")
    if shapes["image"][1] != np.uint8:
        raise damaged(path, f"image has dtype {shapes['image'][1]}, expected uint8")
    layers_heads = f"layers and heads up to {LIMITS['layers']} and {LIMITS['heads']}"

    def lh(s: tuple[int, ...]) -> bool:
        return 1 <= s[0] <= LIMITS["layers"] and 1 <= s[1] <= LIMITS["heads"]

    ca = shape("cross_attention")
    if ca is not None:
        need("cross_attention", len(ca) == 5 and lh(ca) and ca[2:] == (steps, rows, cols), f"(layers, heads, {steps}, {rows}, {cols}), {layers_heads}")
    ps = shape("prefix_share")
    if ps is not None:
        need("prefix_share", ca is not None and ps == ca[:2] + (steps,), "(layers, heads, steps) of the cross-attention")
    joined, ks = shape("view_maps"), shape("key_shares")
    if joined is not None:
        width = trace_views.joined_width(trace_views.views_from_header(header) or ())
        need("view_maps", ca is not None and width > 0 and joined == ca[:3] + (width,), f"(layers, heads, steps, {width}) beside the cross-attention")
    if ks is not None:
        kinds = len(header.get("share_kinds", []))
        need("key_shares", ca is not None and ks == (kinds,) + ca[:3], f"({kinds}, layers, heads, steps) of the cross-attention")
    enc = shape("encoder_self_attention")
    if enc is not None:
        keys = prefix + rows * cols
        need("encoder_self_attention", len(enc) == 4 and lh(enc) and enc[2:] == (keys, keys), f"(layers, heads, {keys}, {keys}), {layers_heads}")
    dec = shape("decoder_self_attention")
    if dec is not None:
        need("decoder_self_attention", len(dec) == 4 and lh(dec) and dec[2:] == (steps, steps), f"(layers, heads, {steps}, {steps}), {layers_heads}")
    total = sum(nbytes for _, _, nbytes in shapes.values())
    if total > max_bytes:
        raise AttnlabError(
            f"{path} was refused: its arrays would take {total / 1024**2:,.0f} MiB, more than max_bytes "
            f"({max_bytes / 1024**2:,.0f} MiB); if you trust the file, load it with CaptionTrace.load(path, max_bytes=...)"
        )


def _check_values(path: Path, arrays: dict[str, np.ndarray]) -> None:
    ids = arrays["token_ids"]
    logits = arrays.get("logits")
    vocab = None if logits is None else logits.shape[1]
    if ids.size and ids.min() < 0:
        raise damaged(path, f"token id {int(ids.min())} is negative")
    if ids.size and ids.max() >= (LIMITS["vocab"] if vocab is None else vocab):
        raise damaged(path, f"token id {int(ids.max())} lies beyond the vocabulary ({'its logits have ' + str(vocab) if vocab else 'at most ' + str(LIMITS['vocab'])} tokens)")
    if logits is not None and (problem := logits_problem(logits)):
        raise damaged(path, problem)
    for name in ("cross_attention", "prefix_share", "encoder_self_attention", "decoder_self_attention", "view_maps", "key_shares"):
        value = arrays.get(name)
        if value is not None and not np.isfinite(value).all():
            raise damaged(path, f"{name} holds NaN or infinite values")


def _v1_to_v2(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    # attnlab 0.1 knew only CATR-like models (every key a patch); the last version-1 files
    # of the captioner seam already wrote prefix_tokens and prefix_share, kept as they are
    header.setdefault("prefix_tokens", 0)


def _v2_to_v3(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    # one view over the whole stored image (the trace's default) and prefix_share as key_shares["prefix"]
    header.setdefault("share_kinds", [])


_UPGRADES = {1: _v1_to_v2, 2: _v2_to_v3}  # version n -> n + 1


def _upgrade(header: dict[str, Any], arrays: dict[str, np.ndarray], version: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    for v in range(version, TRACE_VERSION):
        _UPGRADES[v](header, arrays)
    return header, arrays
