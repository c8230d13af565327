"""Typed configuration of a distillation run.

One dataclass per section; a YAML file is a thin override of these defaults, and the command line
overrides the YAML (``--objective.temperature 0.05``). Every value is validated on load, with an
error that names the field and the allowed values. The resolved config is saved in every
checkpoint (``config.yaml``).

Defaults marked *assumption* are not given by the CoLLD paper; they come from the wav2vec 2.0 /
data2vec recipes.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from colld_ds.errors import ColldError


class ConfigError(ColldError, ValueError):
    """A config value is missing, unknown or out of range; the message names the field."""


@dataclass(kw_only=True)
class TeacherConfig:
    path: str = ""
    """Local Hugging Face directory of the frozen teacher (config.json + weights)."""
    target_kind: Literal["layer_output", "ffn"] = "layer_output"
    """``layer_output``: hidden state after transformer layer i; ``ffn``: that layer's FFN output
    before the residual add (data2vec-style, what USAD says CoLLD uses)."""
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """``auto``: fp16 on CUDA, fp32 on CPU."""
    window_seconds: float | None = None
    """Whisper teachers only: run the encoder on a window this long (a multiple of 0.02 s, at most
    30) instead of Whisper's 30 s; utterances must fit in it. ``None``: 30 s. Much cheaper for
    short utterances, but an approximation of Whisper (see ``families.set_whisper_window`` for
    the measured fidelity); part of the teacher identity, so a cache is tied to its window."""


@dataclass(kw_only=True)
class StudentConfig:
    num_layers: int = 2
    """Transformer layers of the student."""
    hidden_size: int | None = None
    """Student width; ``None`` keeps the teacher's width (needed to copy teacher layers)."""
    num_attention_heads: int | None = None
    """``None`` keeps the teacher's."""
    intermediate_size: int | None = None
    """FFN width; ``None`` keeps the teacher's."""
    freeze_front_end: bool = False
    """Do not train the convolutional front end (copied from the teacher): a cheaper step."""
    frozen_layers: list[int] = field(default_factory=list)
    """Student transformer layers (1-based) that do not train: they keep their initial weights,
    e.g. the teacher layer copied into them, while the layers above learn (their heads still
    train). ``[]``: every layer trains."""
    init_from_teacher_layers: list[int] | None = None
    """Teacher layer copied into each student layer (1-based, one per student layer). ``None``:
    the first ``num_layers`` teacher layers when the widths match (DistilHuBERT's choice), else
    random init. ``[]``: random init."""


@dataclass(kw_only=True)
class LayerMapConfig:
    teacher_layers: list[list[int]] | None = None
    """For each student layer (1..K), the teacher layers (1..L) it predicts. ``None``: uniform,
    student layer k -> teacher layer round(k * L / K). For ``distilhubert`` all pairs use the last
    student layer and this lists the predicted teacher layers per head instead (flattened)."""
    weights: list[float] | None = None
    """Weight of each (student, teacher) pair in the total loss, in map order; ``None``: equal."""


@dataclass(kw_only=True)
class ObjectiveConfig:
    name: Literal["colld", "l2l", "distilhubert"] = "colld"
    """``colld``: masked contrastive layer-to-layer; ``l2l``: regression (L1/MSE + cosine);
    ``distilhubert``: prediction heads on the last layer (L1 - log sigmoid(cos))."""
    temperature: float = 0.1
    """InfoNCE temperature on cosine similarity (CoLLD)."""
    num_negatives: int = 100
    """Negatives per scored frame, sampled from the same utterance's valid frames (CoLLD). At
    most the frames of a ``data.max_seconds`` crop minus one (checked at start-up); shorter
    utterances repeat some, with a warning."""
    anchor_frames: Literal["masked", "all"] = "all"
    """Frames CoLLD scores: ``all`` valid frames, masked or not (as the regression objectives
    do), so the states of unmasked input, which is what the student sees after training, are
    trained too; or ``masked`` only (wav2vec 2.0's masked prediction). ``all`` by measurement:
    a student copied from the teacher loses what its copied layers knew with ``masked``
    (benchmarks/results/quality_whisper_demo_ablation.md)."""
    target_norm: Literal["none", "utterance", "utterance_position"] = "utterance"
    """Each utterance's teacher targets standardised per dimension over its valid frames
    (``utterance``: data2vec's instance norm), which removes what all frames of an utterance
    share before the objective compares them (CoLLD's negatives lie in the same utterance);
    ``utterance_position``: then also minus the mean target at each frame index, estimated
    over ``position_stats_utterances`` training utterances before step 1 and kept in the
    checkpoint, which removes what a frame's position alone predicts (a teacher with absolute
    positional embeddings, such as Whisper); or the targets as they are (``none``)."""
    position_stats_utterances: int = 256
    """Training utterances (over all ranks) whose standardised targets give the mean per frame
    index of ``target_norm: utterance_position``."""
    position_negatives: bool = False
    """CoLLD: also take, as negatives, the teacher frames at the anchor's frame index in the
    other utterances of the micro-batch (B - 1 more per anchor). Same-utterance negatives differ
    from the positive in position, which a student with absolute positional embeddings
    (Whisper) can tell apart without reading content; these cannot be. Needs a backend that
    takes negatives across utterances (not ``dense``)."""
    contrastive_backend: Literal["auto", "triton", "dense", "chunked"] = "auto"
    """Implementation of CoLLD's loss (``colld_ds.kernels.contrastive_loss``): ``auto`` = the fused
    Triton kernel on CUDA, the dense per-utterance matmul elsewhere; the others force one
    (``triton`` needs CUDA, or ``TRITON_INTERPRET=1`` on the CPU)."""
    head: Literal["linear", "mlp"] = "linear"
    """Projection head per pair, student width -> teacher width."""
    distance: Literal["l1", "mse"] = "l1"
    """Regression distance of ``l2l``."""
    cosine_weight: float = 1.0
    """Weight of the cosine term of ``l2l`` / ``distilhubert``."""


@dataclass(kw_only=True)
class MaskingConfig:
    mask_prob: float = 0.65
    """wav2vec 2.0 span masking: spans started per frame x span length (overlaps allowed).
    0 disables masking (the default choice for ``l2l`` and ``distilhubert`` runs is yours)."""
    span_length: int = 10
    min_masks: int = 1


@dataclass(kw_only=True)
class DataConfig:
    train_shards: str = ""
    """Audio shards: a brace pattern (``train-{000000..000127}.tar``), a directory, or a list;
    local paths or streamed URLs (``https://host/train-{000000..000127}.tar``, ``s3://...``,
    ``pipe:cmd``), which need a shard index (``shard_index``)."""
    teacher_cache: str = ""
    """Teacher-cache shards (``colld prep cache-teacher``) to train from instead of
    ``train_shards``: cached mode, the teacher is never run. Empty: online mode."""
    cached_front_end: bool = False
    """Cached mode with a frozen student front end: read the teacher's conv front-end output
    from the cache (``colld prep cache-teacher --front_end true``) and skip the student's conv
    front end (a large share of a cached step), since a frozen front end copied from the teacher
    computes exactly that on the unmasked audio. Needs ``teacher_cache``,
    ``student.freeze_front_end`` and a student front end equal to the teacher's (checked at
    start-up). Whisper: the cache holds the whole window, so ``max_seconds`` must be the window
    (no crops)."""
    shard_index: str = ""
    """Shard index (path or URL) of the shards read (``train_shards`` or ``teacher_cache``).
    Empty: ``shardindex.json`` beside them (written by ``make_shards`` and ``cache-teacher``);
    local shards without one are scanned at start-up, streamed ones need one."""
    codebook_file: str = ""
    """pq and rq caches: the codebook's path or URL when it is not beside the shards, e.g. for
    ``pipe:`` shards (a command has no directory); checked against the cache's identity like
    the one beside them. Empty: ``codebook.npy`` beside the shards (``pq_codebook.npy`` for a
    cache written before codebook format 2: ``colld_ds.formats``)."""
    decode_codes: Literal["auto", "loader", "device"] = "auto"
    """pq and rq caches: where their codes are decoded into targets. ``loader``: in the
    DataLoader workers, which overlap the step. ``device``: the loader ships the (B, T, M)
    uint8 codes and the training step decodes them on its device, the codebook held there
    (``codecs.CodeDecoder``). ``auto`` (default): ``device`` on a GPU, ``loader`` on a CPU. The
    same targets either way (tested); fp16 and int8 caches are always decoded in the loader."""
    on_bad_shard: Literal["stop", "skip"] = "stop"
    """A shard that fails while training reads it (truncated, corrupt, unreachable mid-run):
    ``stop`` (default) ends the run with an error naming it (checkpoints stay intact; restore it
    and ``--run.resume auto``): a damaged shard usually means a storage problem worth fixing,
    and a run that silently sees less data than planned is not reproducible. ``skip``: for long
    multi-node runs where one bad shard must not cost the job: its remaining samples are left
    out, counted, logged by the rank that met it and summed in the run's final summary; that
    worker refills its steps with its other samples read again, so ranks still take equal
    steps (a resume re-reads the same damage and continues exactly)."""
    batch_size: int = 8
    """Utterances per micro-batch per rank (unused when ``batch_seconds`` is set)."""
    batch_seconds: float | None = None
    """Dynamic batching: padded audio seconds per micro-batch per rank (longest cropped
    utterance x utterances); utterances are length-bucketed and the batch size varies. An
    utterance longer than this (only if ``max_seconds`` is) forms a batch alone. ``None``:
    ``batch_size`` utterances per micro-batch."""
    bucket_buffer: int = 256
    """Dynamic batching: utterances per worker sorted by length together (more: less padding,
    more memory, as they are held undecoded)."""
    max_seconds: float = 4.0
    """Random crop of longer utterances (assumption: short crops as in DistilHuBERT/wav2vec 2.0)."""
    num_workers: int = 1
    shuffle_buffer: int = 64

    def __post_init__(self):
        if self.batch_seconds is not None and self.batch_seconds <= 0:
            raise ConfigError("data.batch_seconds: must be > 0 or null")
        if self.bucket_buffer < 1:
            raise ConfigError("data.bucket_buffer: must be >= 1")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    warmup_steps: int = 100
    max_steps: int = 1000
    """Optimiser steps of the run."""
    head_warmup_steps: int = 0
    """For the first N optimiser steps only the projection heads learn (the loss does not
    reach the student): random heads then stop pushing a student copied from the teacher away
    from what it knows before they can tell it anything (linear probing before fine-tuning)."""
    decay: Literal["linear", "cosine"] = "linear"
    grad_clip: float = 10.0
    gradient_accumulation_steps: int = 1


@dataclass(kw_only=True)
class RunConfig:
    out_dir: str = "runs/colld"
    """Checkpoints (``out_dir/checkpoints``), TensorBoard logs (``out_dir/tb``), resolved config."""
    seed: int = 0
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    offload_optimizer: bool = False
    """ZeRO-2/3 optimizer state in CPU memory (DeepSpeed offload)."""
    save_every: int = 500
    """Checkpoint every N optimiser steps (and always at the end)."""
    log_every: int = 10
    keep_checkpoints: int = 3
    ds_config: str | None = None
    """DeepSpeed JSON template; ``None``: ``ds_configs/zero{stage}[_offload].json``. Values the
    training config owns (batch size, accumulation, lr, clipping, precision, stage, scheduler)
    must be ``"auto"`` in it: they are filled from this config so the two never disagree."""
    stop_at_step: int | None = None
    """End this invocation at this step (with a checkpoint) although the schedule runs to
    optim.max_steps: for jobs in time-limited allocations; go on with ``--run.resume auto``."""
    resume: str = "none"
    """``none``, ``auto`` (latest complete checkpoint in out_dir, if any) or a checkpoint dir."""


@dataclass(kw_only=True)
class TrainConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    layer_map: LayerMapConfig = field(default_factory=LayerMapConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a type annotation (as written in this module), converting ints
    to floats and tuples to lists; raise ConfigError naming ``where`` otherwise."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        # the command line (fire) passes `true`/`false` as strings; YAML and `True` are bools
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported annotation {annotation!r} for {where}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(f"{where}{name}: unknown field; {where.rstrip('.') or 'the config'} "
                          f"has {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{name}: expected a mapping of fields, got {value!r}")
            kwargs[name] = _build(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}{name}")
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.replace("-", "_").split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a config section")
    node[leaf] = value


# Fields that earlier versions of colld wrote into saved configs (a run's config.yaml, a
# checkpoint's), with the one value that means what colld does now: such a config still loads;
# any other value is refused, since this version cannot reproduce that run.
_REMOVED_FIELDS = {("objective", "negative_min_distance"): 1}


def _drop_removed_fields(tree: dict[str, Any], source: str) -> None:
    for (section, name), current in _REMOVED_FIELDS.items():
        node = tree.get(section)
        if isinstance(node, dict) and name in node:
            if node[name] != current:
                raise ConfigError(
                    f"{section}.{name}: {node[name]!r} in {source}; the field was removed (this "
                    f"version of colld always does what {current} did), so that run cannot be "
                    f"reproduced or resumed here; use the colld version that wrote it")
            del node[name]


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None
                ) -> TrainConfig:
    """Defaults <- YAML file at ``path`` <- ``overrides`` (``{"objective.temperature": 0.05}``),
    then validated."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        tree = loaded
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    _drop_removed_fields(tree, str(path) if path is not None else "the overrides")
    config = _build(TrainConfig, tree, "")
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Range checks that types alone cannot express."""
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    window = config.teacher.window_seconds
    require(window is None or window > 0, "teacher.window_seconds: must be > 0 or null")
    require(window is None or config.data.max_seconds <= window,
            f"data.max_seconds {config.data.max_seconds} is longer than teacher.window_seconds "
            f"{window}: training crops must fit in the Whisper window; lower data.max_seconds or "
            f"raise teacher.window_seconds")
    require(config.student.num_layers >= 1, "student.num_layers: must be >= 1")
    for name in ("hidden_size", "num_attention_heads", "intermediate_size"):
        value = getattr(config.student, name)
        require(value is None or value >= 1, f"student.{name}: must be >= 1 or null")
    init = config.student.init_from_teacher_layers
    require(init is None or init == [] or len(init) == config.student.num_layers,
            f"student.init_from_teacher_layers: needs one teacher layer per student layer "
            f"({config.student.num_layers}), got {init}")
    frozen = config.student.frozen_layers
    require(all(1 <= layer <= config.student.num_layers for layer in frozen)
            and len(set(frozen)) == len(frozen),
            f"student.frozen_layers: distinct student layers in 1..{config.student.num_layers}, "
            f"got {frozen}")
    layer_map = config.layer_map.teacher_layers
    if layer_map is not None and config.objective.name != "distilhubert":
        require(len(layer_map) == config.student.num_layers,
                f"layer_map.teacher_layers: needs one list per student layer "
                f"({config.student.num_layers}), got {layer_map}")
    if layer_map is not None:
        require(all(len(group) >= 1 for group in layer_map),
                "layer_map.teacher_layers: every student layer needs at least one teacher layer")
    require(config.objective.temperature > 0, "objective.temperature: must be > 0")
    require(config.objective.num_negatives >= 1, "objective.num_negatives: must be >= 1")
    require(config.objective.position_stats_utterances >= 1,
            "objective.position_stats_utterances: must be >= 1")
    require(not (config.objective.position_negatives
                 and config.objective.contrastive_backend == "dense"),
            "objective.position_negatives: its negatives span utterances, which the dense "
            "backend cannot take; set objective.contrastive_backend auto or chunked")
    require(0.0 <= config.masking.mask_prob <= 1.0, "masking.mask_prob: must be in [0, 1]")
    require(config.masking.span_length >= 1, "masking.span_length: must be >= 1")
    require(config.optim.head_warmup_steps >= 0, "optim.head_warmup_steps: must be >= 0")
    require(config.objective.name != "colld" or config.masking.mask_prob > 0
            or config.objective.anchor_frames == "all",
            "masking.mask_prob: colld with objective.anchor_frames masked scores masked frames "
            "only; it needs > 0 (or objective.anchor_frames all)")
    require(not config.data.cached_front_end or bool(config.data.teacher_cache),
            "data.cached_front_end: reads the front end from the teacher cache; set "
            "data.teacher_cache (a cache-teacher --front_end true directory) or set "
            "data.cached_front_end false")
    require(not config.data.cached_front_end or config.student.freeze_front_end,
            "data.cached_front_end: the student skips its conv front end, so it must not train; "
            "set student.freeze_front_end true (or data.cached_front_end false)")
    require(not config.data.codebook_file or bool(config.data.teacher_cache),
            "data.codebook_file: the codebook of a pq or rq teacher cache; set "
            "data.teacher_cache or leave data.codebook_file empty")
    require(config.data.batch_size >= 1, "data.batch_size: must be >= 1")
    require(config.data.max_seconds > 0, "data.max_seconds: must be > 0")
    require(config.data.num_workers >= 0, "data.num_workers: must be >= 0")
    require(config.optim.lr > 0, "optim.lr: must be > 0")
    require(config.optim.max_steps >= 1, "optim.max_steps: must be >= 1")
    require(1 <= config.optim.warmup_steps <= config.optim.max_steps,
            "optim.warmup_steps: must be between 1 and optim.max_steps (DeepSpeed's schedulers "
            "need at least one warm-up step)")
    require(len(config.optim.betas) == 2 and all(0 <= b < 1 for b in config.optim.betas),
            "optim.betas: two numbers in [0, 1)")
    require(config.optim.gradient_accumulation_steps >= 1,
            "optim.gradient_accumulation_steps: must be >= 1")
    stop = config.run.stop_at_step
    require(stop is None or 1 <= stop <= config.optim.max_steps,
            "run.stop_at_step: must be between 1 and optim.max_steps, or null")
    require(config.run.save_every >= 1, "run.save_every: must be >= 1")
    require(config.run.log_every >= 1, "run.log_every: must be >= 1")
    require(config.run.keep_checkpoints >= 1, "run.keep_checkpoints: must be >= 1")
    require(not (config.run.offload_optimizer and config.run.zero_stage < 2),
            "run.offload_optimizer: needs run.zero_stage 2 or 3")


def check_num_negatives(config: TrainConfig, crop_frames: int) -> None:
    """CoLLD draws ``objective.num_negatives`` negatives among the other frames of an utterance;
    a longest crop (``data.max_seconds``) of ``crop_frames`` frames must supply that many, or
    the negatives of every utterance repeat. Checked at start-up, once the teacher gives the
    frame rate."""
    limit = crop_frames - 1
    if config.objective.name == "colld" and config.objective.num_negatives > limit:
        raise ConfigError(
            f"objective.num_negatives: {config.objective.num_negatives} is more than the {limit} "
            f"other frames of a data.max_seconds {config.data.max_seconds} s crop ({crop_frames} "
            f"teacher frames), so every utterance's negatives would repeat; set "
            f"objective.num_negatives to at most {limit} or raise data.max_seconds")


def _field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source), whitespace joined."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def describe_config() -> str:
    """Every config section and field, as ``--section.field: type = default`` and its
    docstring: what ``colld train --help`` lists."""
    lines = []
    for section in dataclasses.fields(TrainConfig):
        cls = typing.get_type_hints(TrainConfig)[section.name]
        docs = _field_docs(cls)
        lines.append(f"{section.name}:")
        for item in dataclasses.fields(cls):
            default = (item.default_factory() if item.default is dataclasses.MISSING
                       else item.default)
            lines.append(f"  --{section.name}.{item.name}: {item.type} = {default!r}")
            if item.name in docs:
                lines += textwrap.wrap(docs[item.name], 96, initial_indent=" " * 6,
                                       subsequent_indent=" " * 6)
    return "\n".join(lines)


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
