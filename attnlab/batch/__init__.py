"""Captioning many images: folders, glob patterns, shards and resumable runs.

``attnlab caption photos/ --out results`` (or :func:`caption_folder`) runs:

1. :func:`plan_run`: the images of the folders (read recursively) and glob
   patterns, sorted; each named after its path relative to the folder
   (:func:`attnlab.outputs.mirror_names`: ``photos/cats/x.jpg`` ->
   ``results/cats/x.jpg.npz``), so names are unique, the same in every run and
   independent of sharding; ``shard=(k, n)`` keeps every ``n``-th image from
   the ``k``-th on (disjoint, deterministic slices that together cover all).
2. A :class:`torch.utils.data.DataLoader` whose worker processes hash each
   image, check its earlier outputs (:func:`attnlab.outputs.resume_state`:
   complete and written for the same file and the same settings -> skipped)
   and read and resize it by the captioner's spec
   (:func:`attnlab.preprocess.prepare_for`).
3. The main process groups the prepared images (of any sizes) into batches of
   ``batch_size`` and decodes each batch at once
   (:func:`attnlab.decode.decode_batch`: finished captions leave the batch);
   every image gets exactly what it gets alone.
4. Each trace is written as soon as its batch is done (atomically, with the
   run's settings in ``meta["run"]``) and never held: memory stays flat.
5. ``captions.jsonl`` (one JSON object per image: image, name, caption, words,
   trace, and figure and html page when asked) and ``errors.jsonl`` (image, name, error) in the output
   folder; a shard ``k`` of ``n`` writes ``captions.k-of-n.jsonl`` and
   ``errors.k-of-n.jsonl`` instead, so shards never write the same file. Each
   starts with a header line only attnlab writes (:mod:`attnlab.runlist`): a file of
   that name without it is never replaced or deleted unless ``overwrite``.

Ctrl-C finishes the batch being decoded, writes the captions and errors files
and stops (a second Ctrl-C stops at once and drops that batch); nothing
partial is left, and the same command resumes where it stopped.
"""


from .inputs import IMAGE_SUFFIXES, Item, find_images, is_pattern, parse_shard, shard_items, sidecar_names
from .plan import RunPlan, as_half, plan_run, run_settings, weights_digest
from .runner import RunReport, caption_folder, default_workers, run_plan

__all__ = [
    "IMAGE_SUFFIXES",
    "Item",
    "RunPlan",
    "RunReport",
    "as_half",
    "caption_folder",
    "default_workers",
    "find_images",
    "is_pattern",
    "parse_shard",
    "plan_run",
    "run_plan",
    "run_settings",
    "shard_items",
    "sidecar_names",
    "weights_digest",
]
