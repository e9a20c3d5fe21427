"""Where ``attnlab caption --out`` and ``attnlab demo`` put their files, and how they are named.

Per input image ``<stem>.<ext>`` the output folder gets two files:

* ``<stem>.npz``: the trace (:class:`attnlab.CaptionTrace`), and
* ``<stem>.attn.png``: the word grid figure;
* with ``--html`` also ``<stem>.html``: the explorer as one offline web page
  (:func:`attnlab.export_html`).

Rules (they protect the user's files):

* Names are unique by construction for any list of inputs: inputs whose stems
  clash (same name in two folders, names that differ only in case, ``x.png`` and
  ``x.jpg``) keep the plain stem for the first one and get ``-2``, ``-3`` ... for
  the others, skipping every stem another input already has (``x-2.png`` keeps
  ``x-2``). Trace names end in ``.npz`` and figure names in ``.attn.png``, so no
  trace can be named like a figure.
* A planned output is never one of the inputs (refused, ``--overwrite`` or not).
* An existing file is replaced only when attnlab wrote it for the same input:
  traces record the input's resolved path and SHA-256 in ``meta["source"]`` and
  ``meta["source_sha256"]``, figures in a PNG text chunk ``attnlab`` and web
  pages in a ``<meta name="attnlab-source">`` of their head (a page of an
  earlier version, without one, is attnlab's when the trace beside it records
  the page's SHA-256, ``meta["html_sha256"]``). Anything
  else (a photo, a file from another image, another program's file) is refused
  unless the user passes ``--overwrite``. Folders and other non-files in the way
  are always refused.
* Trace, figure and page are written to temporary files first and renamed into
  place only when all were written, the trace last; if anything fails, every
  file that was there before is left exactly as it was. The trace records the
  SHA-256 of the figure and page written with it (``meta["figure_sha256"]``,
  ``meta["html_sha256"]``), so the outputs of a run killed between the renames
  are never taken as done: the next run writes them again.

Folders and glob patterns (``attnlab caption photos/ --out DIR``, see
:mod:`attnlab.batch`) name outputs after each image's path relative to the
folder instead: ``photos/cats/tabby.jpg`` gets ``DIR/cats/tabby.jpg.npz`` (and
with ``--figures`` ``DIR/cats/tabby.jpg.attn.png``), so names are unique because
the paths are, whatever else the folder holds, and the same in every run and
every shard (:func:`mirror_names`, :func:`plan_mirrored`). Such runs resume:
:func:`resume_state` tells an image whose outputs are complete and were written
for the same input with the same settings (``meta["run"]``) from one that must
be (re)done and from one whose outputs may not be touched.

The rules as users read them: "Where files go" on the documentation site (``docs/files.md``).

Three modules, one concept each: :mod:`~attnlab.outputs.naming` (the names),
:mod:`~attnlab.outputs.ownership` (which files may be written over; resuming),
:mod:`~attnlab.outputs.write` (all files of an input or none); every name is
importable from ``attnlab.outputs``.
"""

from ..util import file_sha256
from .naming import (
    FIGURE_SUFFIX,
    HTML_SUFFIX,
    TRACE_SUFFIX,
    Planned,
    Source,
    check_out_dir,
    mirror_names,
    plan_mirrored,
    plan_outputs,
    unique_names,
    unique_stems,
)
from .ownership import PAGE_MARK, PNG_TAG, Resume, ResumeState, check_plan, resume_state
from .write import write_outputs

__all__ = [
    "FIGURE_SUFFIX",
    "HTML_SUFFIX",
    "PAGE_MARK",
    "PNG_TAG",
    "TRACE_SUFFIX",
    "Planned",
    "Resume",
    "ResumeState",
    "Source",
    "check_out_dir",
    "check_plan",
    "file_sha256",
    "mirror_names",
    "plan_mirrored",
    "plan_outputs",
    "resume_state",
    "unique_names",
    "unique_stems",
    "write_outputs",
]
