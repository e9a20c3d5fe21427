"""``load_model``: the bundled shapes model, published CATR checkpoints, your own.

Names:
* ``None`` or ``"shapes"``: the small model shipped inside attnlab (offline).
* ``"catr-v1" | "catr-v2" | "catr-v3"``: CATR's published checkpoints, downloaded
  once into :func:`attnlab.download.cache_dir` with the ``bert-base-uncased``
  vocabulary, and read from there afterwards (offline too). Downloads are checked
  before they enter the cache; a cached file that no longer loads is renamed
  ``<name>.bad`` and fetched again (:func:`attnlab.download.cached`).
* ``"catr"`` with ``checkpoint=PATH``: a CATR checkpoint of your own
  (``{'model': state_dict}`` or a bare state dict), ``vocab=PATH`` optional.
* ``"shapes-cptr"``: the bundled CPTR-style model (a small timm ViT, offline).
* ``"shapes-vlm"``: the bundled vision-language model (a tiny
  ``LlavaForConditionalGeneration``, offline; needs ``transformers``): loaded as the
  captioner :func:`attnlab.from_huggingface` makes of it, with its fixed prompt.
* ``"cptr"`` with ``checkpoint=PATH``: a CPTR checkpoint saved by
  :func:`save_checkpoint` (configuration and vocabulary travel with the weights).

:data:`MODELS` is the one registry of these names (what each is and how it loads);
the CLI's ``--model`` help and the "unknown model" error are read from it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .captioner import check_best_head
from .checkpoints import check_state_dict, count_layers, describe_state_dict, read_checkpoint, state_dict_of
from .config_check import check_config, check_config_fits
from .download import cache_dir, cached
from .errors import AttnlabError
from .fileio import atomic_write
from .models.catr import CATR, CATRConfig
from .models.cptr import CPTR, CPTRConfig
from .tokenizer import Vocab
from .util import one_line

CHECKPOINT_URLS = {
    "catr-v1": "https://github.com/saahiluppal/catr/releases/download/0.1/weights_9348032.pth",
    "catr-v2": "https://github.com/saahiluppal/catr/releases/download/0.2/weight389123791.pth",
    "catr-v3": "https://github.com/saahiluppal/catr/releases/download/0.2/weight493084032.pth",
}
VOCAB_URL = "https://huggingface.co/google-bert/bert-base-uncased/resolve/main/vocab.txt"
VOCAB_FILE = "bert-base-uncased-vocab.txt"
BUNDLED = Path(__file__).parent / "weights" / "shapes.pt"
BUNDLED_CPTR = Path(__file__).parent / "weights" / "shapes-cptr.pt"
ATTNLAB_FORMAT = "attnlab-catr"
CPTR_FORMAT = "attnlab-cptr"


def infer_config(sd: dict[str, torch.Tensor]) -> CATRConfig:
    """CATR configuration read off a state dict's shapes (heads cannot be: 8, CATR's).

    Lets a student's own CATR variant (another vocabulary, fewer layers) load.
    Falls back to CATR's values for anything missing.
    """
    c = CATRConfig()
    try:
        word = sd["transformer.embeddings.word_embeddings.weight"]  # (V, E)
        c.vocab_size, c.d_model = int(word.shape[0]), int(word.shape[1])
        c.max_positions = int(sd["transformer.embeddings.position_embeddings.weight"].shape[0])
        c.dim_feedforward = int(sd["transformer.encoder.layers.0.linear1.weight"].shape[0])
        c.mlp_hidden = int(sd["mlp.layers.0.weight"].shape[0])
    except KeyError:
        return CATRConfig()
    c.enc_layers = count_layers(sd, "transformer.encoder.layers.") or c.enc_layers
    c.dec_layers = count_layers(sd, "transformer.decoder.layers.") or c.dec_layers
    if "backbone.0.body.stage0.conv1.weight" in sd:
        c.backbone = "small"
        stages = count_layers(sd, "backbone.0.body.stage")
        try:  # one width per stage, read off its first convolution (out, in, 3, 3)
            c.backbone_channels = tuple(int(sd[f"backbone.0.body.stage{i}.conv1.weight"].shape[0]) for i in range(stages))
        except KeyError:
            pass  # a stage is missing: check_state_dict names it
    return c


def _special_ids_from_vocab(config: CATRConfig, vocab: Vocab) -> None:
    """Start/end/pad ids from a BERT-style vocabulary's ``[CLS]``/``[SEP]``/``[PAD]``.

    CATR's own vocabulary gives 101/102/0 (its defaults); a variant trained on
    another vocabulary has them elsewhere, and the ids cannot be read off the weights.
    """
    for token, attr in (("[CLS]", "start_token_id"), ("[SEP]", "end_token_id"), ("[PAD]", "pad_token_id")):
        if token in vocab:
            setattr(config, attr, vocab.id_of(token))


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` this machine has; one line naming what to use otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise AttnlabError(f"unknown device {device!r}: use 'cpu' or 'cuda'") from None
    if dev.type == "meta":
        raise AttnlabError("device 'meta' holds shapes but no numbers, so nothing can be captioned: use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AttnlabError("CUDA is not available on this machine: use device='cpu' (CLI: --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AttnlabError(f"there is no {dev} (this machine has {torch.cuda.device_count()} CUDA devices): use 'cuda:0' or 'cpu'")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise AttnlabError("MPS (Apple GPU) is not available on this machine: use device='cpu' (CLI: --device cpu)")
    return dev


def _to_device(model: CATR, device: str | torch.device) -> CATR:
    dev = check_device(device)
    try:
        return model.to(dev).eval()
    except (RuntimeError, AssertionError) as exc:  # another backend that is not there (xpu, hpu, ...)
        raise AttnlabError(f"cannot use device {str(dev)!r} ({one_line(exc, 100)}): use 'cpu'") from None


def _warn_nonfinite(sd: dict[str, torch.Tensor], source: str) -> None:
    """Warn when weights hold NaN or infinite values: every caption and map would be meaningless."""
    # a sum is NaN or infinite when any entry is (a fast screen; 40x faster than isfinite here), then exactly
    bad = [
        k for k, v in sd.items()
        if v.is_floating_point() and not bool(torch.isfinite(v.sum())) and not bool(torch.isfinite(v).all())
    ]
    if bad:
        more = f" and {len(bad) - 1} more tensors" if len(bad) > 1 else ""
        warnings.warn(
            f"{source} holds NaN or infinite weights ({bad[0]}{more}): its captions and attention maps will be meaningless",
            stacklevel=4,
        )


def _stored_vocab(obj: dict[str, Any], config: CATRConfig | CPTRConfig, source: str) -> Vocab | None:
    """The vocabulary inside an attnlab-format checkpoint (``None`` when it has none)."""
    tokens = obj.get("vocab")
    if not tokens:
        return None
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise AttnlabError(f"{source} has a damaged vocabulary (not a list of strings); re-save the model with attnlab.save_checkpoint")
    if len(tokens) != config.vocab_size:
        raise AttnlabError(f"{source} stores {len(tokens)} tokens for a model that predicts {config.vocab_size}; re-save the model with attnlab.save_checkpoint")
    return Vocab(tokens, wordpiece=bool(obj.get("wordpiece", False)))


def _read_bert_vocab(path: Path) -> Vocab:
    """The downloaded BERT vocabulary; a web page or a cut file is refused."""
    vocab = Vocab.from_file(path)
    first = vocab.tokens[0].strip().lower()
    if first.startswith(("<!doctype", "<html", "<?xml", "{")):
        raise AttnlabError(f"{path} is a web page or data file, not a vocabulary (first line {vocab.tokens[0][:30]!r})")
    missing = [t for t in ("[PAD]", "[CLS]", "[SEP]") if t not in vocab]
    if missing:
        raise AttnlabError(f"{path} is not the BERT vocabulary: it lacks {', '.join(missing)} ({len(vocab)} lines)")
    return vocab


def _read_catr_checkpoint(path: Path) -> dict[str, Any]:
    """A downloaded checkpoint, which must hold CATR weights."""
    obj = read_checkpoint(path)
    sd = state_dict_of(obj, str(path))
    if not any(k.startswith("transformer.") for k in sd):
        raise AttnlabError(f"{path} is not a CATR checkpoint; the file looks like {describe_state_dict(sd)}")
    return obj


def _best_head(obj: dict[str, Any], source: str, layers: int, heads: int) -> tuple[int, int] | None:
    """The ``(layer, head)`` recorded in a checkpoint's ``meta["best_head"]`` (attnlab's grounding
    selection, see :func:`attnlab.shapes.grounding.select_best_head`), or ``None``."""
    meta = obj.get("meta")
    found = meta.get("best_head") if isinstance(meta, dict) else None
    if found is None:
        return None
    try:
        layer, head = check_best_head(found)
    except AttnlabError as exc:
        raise AttnlabError(f"{source} has a damaged best-head record ({exc}); re-save the model with attnlab.save_checkpoint") from None
    if layer >= layers or head >= heads:
        raise AttnlabError(f"{source} records best head (layer {layer}, head {head}) for a model of {layers} layers x {heads} heads: the file is damaged")
    return layer, head


def _cptr_from_checkpoint(obj: dict[str, Any], path: str | Path, given_vocab: Vocab | None, name: str) -> CPTR:
    """A :class:`CPTR` from an ``attnlab-cptr`` checkpoint; its shapes are checked on a
    skeleton without memory (``meta`` device) before the real model is built."""
    sd = state_dict_of(obj, str(path))
    try:
        config = CPTRConfig.from_dict(obj.get("config"))
    except AttnlabError as exc:  # say which file
        raise AttnlabError(f"{path} has a damaged config ({exc}); re-save the model with attnlab.save_checkpoint") from None
    config.pretrained = False  # the weights come from the file
    sizes = {  # cheap checks first: a hostile config must not build a huge skeleton
        "decoder layers": (config.dec_layers, count_layers(sd, "layers.")),
        "encoder blocks": (config.encoder_args.get("depth"), count_layers(sd, "encoder.blocks.")),
        "encoder width": (config.encoder_args.get("embed_dim"), sd.get("encoder.patch_embed.proj.weight", torch.empty(0)).shape[0]),
    }
    for what, (declared, found) in sizes.items():
        if declared is not None and declared != found:
            raise AttnlabError(f"{path} does not fit its own configuration ({what}: {declared} declared, {found} in the weights): the file is damaged")
    tokens = given_vocab or _stored_vocab(obj, config, str(path))  # a list of as many strings as the head predicts
    if tokens is not None and len(tokens) != config.vocab_size:
        raise AttnlabError(f"the vocabulary has {len(tokens)} tokens but {path} predicts {config.vocab_size}: pass the model's own vocab.txt")
    name = obj.get("name", name) if isinstance(obj.get("name"), str) else name
    with torch.device("meta"):
        skeleton = CPTR(config, vocab=tokens, name=name)
    check_state_dict(skeleton, sd, str(path))
    model = CPTR(config, vocab=tokens, name=name, best_head=_best_head(obj, str(path), config.dec_layers, config.nheads))
    model.load_state_dict(sd)
    if tokens is None:
        warnings.warn(f"no vocabulary for {path}: words are shown as [id]; pass vocab=PATH (CLI: --vocab PATH) to its vocab.txt", stacklevel=3)
    return model


def build_from_checkpoint(
    path: str | Path, vocab: str | Path | Vocab | None = None, name: str = "catr", *, obj: dict[str, Any] | None = None
) -> CATR | CPTR:
    """A model from a checkpoint file: attnlab's own formats (CATR-style or CPTR) or CATR's.

    ``vocab``: a ``vocab.txt`` path or a :class:`Vocab`; ``obj``: the file's content
    when it was read already. Nothing is built before the configuration (stored in
    attnlab's format, read off the weights in CATR's) has been checked and found to
    fit the weights' shapes (:mod:`attnlab.config_check`).
    """
    obj = read_checkpoint(path) if obj is None else obj
    source = str(path)
    sd = state_dict_of(obj, source)
    given_vocab = vocab if isinstance(vocab, Vocab) or vocab is None else Vocab.from_file(vocab)
    if obj.get("format") == CPTR_FORMAT:
        return _cptr_from_checkpoint(obj, path, given_vocab, name if name != "catr" else "cptr")
    attnlab_format = obj.get("format") == ATTNLAB_FORMAT
    if attnlab_format:
        config = check_config(obj.get("config"), source)
        vocabulary = _stored_vocab(obj, config, source)
        name = obj.get("name", name)
        if not isinstance(name, str):
            raise AttnlabError(f"{source} has a damaged name ({type(name).__name__}); re-save the model with attnlab.save_checkpoint")
    else:
        if not any(k.startswith("transformer.") for k in sd):
            raise AttnlabError(f"{path} is not a CATR checkpoint; the file looks like {describe_state_dict(sd)}")
        config = infer_config(sd)
        vocabulary = None
    if given_vocab is not None:
        if len(given_vocab) != config.vocab_size:
            label = "the downloaded vocabulary" if isinstance(vocab, Vocab) else f"vocabulary {vocab}"
            raise AttnlabError(
                f"{label} has {len(given_vocab)} tokens but the model predicts {config.vocab_size}: pass the model's own vocab.txt"
            )
        vocabulary = given_vocab
        if not attnlab_format:
            _special_ids_from_vocab(config, given_vocab)
    specials = {"start": config.start_token_id, "end": config.end_token_id, "pad": config.pad_token_id}
    if max(specials.values()) >= config.vocab_size:
        ids = ", ".join(f"{k} {v}" for k, v in specials.items())
        raise AttnlabError(
            f"{path} predicts {config.vocab_size} tokens, too few for the special token ids ({ids}): "
            "pass vocab=PATH (CLI: --vocab PATH) to its vocab.txt holding [CLS], [SEP] and [PAD]"
        )
    if not attnlab_format:  # read off the weights: bounded by the file, but must still make a model
        config = check_config(config.to_dict(), source, stored=False)
    check_config_fits(config, sd, source)  # before anything is allocated
    _warn_nonfinite(sd, source)
    model = CATR(config, vocab=vocabulary, name=name, best_head=_best_head(obj, source, config.dec_layers, config.nheads))
    model.load_state_dict(sd, strict=False)  # num_batches_tracked entries are dropped by FrozenBatchNorm2d
    if vocabulary is None:
        warnings.warn(
            f"no vocabulary for {path}: words are shown as [id]; pass vocab=PATH (CLI: --vocab PATH) to its vocab.txt",
            stacklevel=3,
        )
    return model


def save_checkpoint(model: CATR | CPTR, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Save ``model`` in attnlab's format (config and vocabulary travel with the weights).

    ``meta``: free facts stored with it (a training record); a model with a
    ``spec.best_head`` keeps it as ``meta["best_head"]`` unless ``meta`` says otherwise.
    """
    spec = model.spec
    vocab = spec.vocab
    meta = dict(meta or {})
    if spec.best_head is not None and "best_head" not in meta:
        meta["best_head"] = {"layer": spec.best_head[0], "head": spec.best_head[1]}
    obj = {
        "format": CPTR_FORMAT if isinstance(model, CPTR) else ATTNLAB_FORMAT,
        "version": 1,
        "name": spec.name,
        "config": model.config.to_dict(),
        "vocab": getattr(vocab, "tokens", None) or None,  # an IdVocab (no vocabulary) has no tokens
        "wordpiece": bool(getattr(vocab, "wordpiece", False)),
        "model": model.state_dict(),
        "meta": meta,
    }
    return atomic_write(Path(path), lambda fh: torch.save(obj, fh))


def _bundled(name: str, vocab: str | Path | None) -> CATR | CPTR:
    path = BUNDLED if name == "shapes" else BUNDLED_CPTR
    if not path.is_file():
        raise AttnlabError(f"the bundled {name} model is missing ({path}): reinstall attnlab")
    return build_from_checkpoint(path, vocab) if name == "shapes" else build_from_checkpoint(path, vocab, name)


def _published(name: str, vocab: str | Path | None) -> CATR:
    root = cache_dir()
    ckpt = root / f"{name}.pth"
    obj = cached(CHECKPOINT_URLS[name], ckpt, _read_catr_checkpoint)
    vocabulary = Path(vocab) if vocab is not None else cached(VOCAB_URL, root / VOCAB_FILE, _read_bert_vocab)
    return build_from_checkpoint(ckpt, vocabulary, name, obj=obj)


def load_shapes_vlm(folder: str | Path | None = None, device: str | torch.device = "cpu") -> Any:
    """The bundled shapes vision-language model (or a ``save_pretrained`` folder of the same
    kind) as a captioner: ``from_huggingface(model, processor, prompt="describe the scene .")``.

    Args:
        folder: a ``save_pretrained`` folder of the model and its processor (default: the bundled one).
        device: where the model runs (``"cpu"``, ``"cuda"``, ...); one line if it cannot be used.

    Returns:
        a vision-language captioner: pass it to :func:`attnlab.caption`, :func:`attnlab.explain.explain` and
        the figures like any other model. Needs ``transformers`` (imported here, lazily)."""
    from .adapters.hf.shapes_vlm import FOLDER, PROMPT, load
    from .adapters.huggingface import from_huggingface

    dev = check_device(device)
    model, processor = load(FOLDER if folder is None else folder)
    try:
        model = model.to(dev)
    except (RuntimeError, AssertionError) as exc:
        raise AttnlabError(f"cannot use device {str(dev)!r} ({one_line(exc, 100)}): use 'cpu'") from None
    return from_huggingface(model, processor, prompt=PROMPT, name="shapes-vlm")


def _bundled_vlm(name: str, vocab: str | Path | None) -> Any:
    if vocab is not None:
        raise AttnlabError(f"the bundled {name} model brings its own tokenizer: leave vocab out")
    return load_shapes_vlm()


@dataclass(frozen=True)
class NamedModel:
    """A name :func:`load_model` accepts: what it is, and ``load(name, vocab)`` (``None``: it needs ``checkpoint=PATH``)."""

    about: str
    load: Callable[[str, str | Path | None], Any] | None = None


MODELS: dict[str, NamedModel] = {
    "shapes": NamedModel("the bundled shapes model (CNN, offline; the default)", _bundled),
    "shapes-cptr": NamedModel("the bundled shapes ViT captioner (CPTR-style, offline)", _bundled),
    "shapes-vlm": NamedModel("the bundled shapes vision-language model (LLaVA-style, offline; needs transformers)", _bundled_vlm),
    **{n: NamedModel(f"CATR's published checkpoint {n[5:]} (downloaded once, then cached)", _published) for n in CHECKPOINT_URLS},
    "catr": NamedModel("a CATR checkpoint of your own (with checkpoint=PATH)"),
    "cptr": NamedModel("a CPTR checkpoint written by save_checkpoint (with checkpoint=PATH)"),
}
NAMES = tuple(MODELS)


def model_names(with_checkpoint: bool = False) -> tuple[str, ...]:
    """The names :func:`load_model` loads by themselves, or (``with_checkpoint``) those that need ``checkpoint=PATH``."""
    return tuple(n for n, m in MODELS.items() if (m.load is None) == with_checkpoint)


def load_model(
    name: str | None = None,
    *,
    checkpoint: str | Path | None = None,
    vocab: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> Any:
    """Load a captioning model in eval mode (``CATR``, ``CPTR``, or for ``"shapes-vlm"`` a vision-language captioner).

    Args:
        name: ``None``/``"shapes"`` or ``"shapes-cptr"`` (bundled, offline),
            ``"shapes-vlm"`` (bundled vision-language model: a captioner of
            :func:`attnlab.from_huggingface`; needs ``transformers``),
            ``"catr-v1"``, ``"catr-v2"``, ``"catr-v3"`` (downloaded once, then
            cached), or ``"catr"``/``"cptr"`` with ``checkpoint`` (``None`` with a
            checkpoint: whichever kind the file holds).
        checkpoint: path of a checkpoint to load instead of a named one.
        vocab: path of a ``vocab.txt`` for ``checkpoint`` (else words show as ``[id]``).
        device: ``"cpu"``, ``"cuda"``, ...
    """
    if checkpoint is not None:
        if name not in (None, "catr", "cptr"):
            raise AttnlabError(f"give either a model name or checkpoint=PATH, not both ({name!r})")
        model = build_from_checkpoint(checkpoint, vocab, name or "catr")
        if name == "cptr" and not isinstance(model, CPTR):
            raise AttnlabError(f"{checkpoint} is not a CPTR checkpoint (it holds a CATR-style model): load it with load_model('catr', checkpoint=...)")
        if name == "catr" and isinstance(model, CPTR):
            raise AttnlabError(f"{checkpoint} holds a CPTR (timm ViT) captioner: load it with load_model('cptr', checkpoint=...)")
        return _to_device(model, device)
    name = "shapes" if name is None else name
    entry = MODELS.get(name) if isinstance(name, str) else None
    if entry is None:
        own = " / ".join(repr(n) for n in model_names(with_checkpoint=True))
        raise AttnlabError(f"unknown model {name!r}: choose one of {', '.join(model_names())}, or {own} with checkpoint=PATH")
    if entry.load is None:
        raise AttnlabError(f"model {name!r} needs checkpoint=PATH (or the CLI's --checkpoint PATH)")
    loaded = entry.load(name, vocab)
    if isinstance(loaded, torch.nn.Module):
        return _to_device(loaded, device)
    _to_device(loaded.model, device)  # a captioner around a module (shapes-vlm): the module moves in place
    return loaded
