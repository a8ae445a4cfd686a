"""Evaluation sets as the devices read them: prepared once (`prepare`) or streamed (`stream`).

A `Prepared` set is decoded and preprocessed once (`jaxmodels.data.preprocess.prepare_for_eval`)
and kept as uint8 images in T global batches of B: on the devices with its labels and valid
flags, as `row_batches.DeviceRows` in batches (placement 'device': device s holds its B/S rows of
every batch, and the row engine the committees use runs a pass as one program), or as this
process's rows [T, L, S, S, 3] in host memory (placement 'host'). A `Streamed` set reads its
source batch by batch for one pass. Either is what `jaxmodels.inference.evaluate` and
`jaxmodels.inference.features` run over; `as_dataset` turns any data argument into one.

Multi-host: each process holds (or reads) the contiguous rows [p·L, (p+1)·L) of every global
batch (`local_layout`).

Shapes: N examples, T batches, B global batch, L = B / process count, S image side.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxmodels import sharding
from jaxmodels.data import pipeline, preprocess
from jaxmodels.data import sources as data_lib
from jaxmodels.data.array_source import ArraySource
from jaxmodels.inference import image_batches, row_batches
from jaxmodels.models import registry

# Per device: the images of a prepared set stay on the devices up to this size by default.
_DEVICE_BYTES = 2 << 30
_PER_DEVICE_BATCH = 32


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
    """An evaluation set decoded and preprocessed once (`prepare`), for many forward passes.

    Attributes:
      images: this process's rows as NumPy uint8 [T, L, S, S, 3] (placement 'host'), else None.
      rows: placement 'device': `row_batches.DeviceRows` in batches holding the arrays
        (images uint8 [.., S, S, 3], labels int32, valid bool), padding rows invalid; else None.
      labels: int32 [N] labels of all N examples, in input order (−1 where the data had none).
      num_examples: N.
      preprocessing: how the images were prepared (`jaxmodels.Preprocessing`).
      mesh: the mesh the set lives on.
      fingerprint: identifies the data and the preprocessing (cache keys).
      batch_size: B, the global batch of one step.
      num_batches: T, the global steps of one pass (the same on every process).
    """

    images: np.ndarray | None
    rows: row_batches.DeviceRows | None
    labels: np.ndarray
    num_examples: int
    preprocessing: preprocess.Preprocessing
    mesh: Mesh
    fingerprint: str
    batch_size: int
    num_batches: int

    @property
    def on_host(self) -> bool:
        return self.rows is None

    def host_batches(self):
        """This process's batches as `image_batches.HostBatch`es (for streamed passes)."""
        if not self.on_host:
            raise ValueError("host_batches needs a host-resident Prepared (placement='host')")
        local = self.images.shape[1]
        labels_TL, valid_TL = local_layout(self.labels, self.images.shape[0], local)
        for images, labels, valid in zip(self.images, labels_TL, valid_TL, strict=True):
            yield image_batches.HostBatch(images, labels, valid, int(valid.sum()), True)

    def host_images(self) -> np.ndarray:
        """All N prepared images as NumPy uint8 [N, S, S, 3] in input order, on every process
        (a copy from the devices, or of every process's host rows)."""
        if self.on_host:
            return gather_steps(list(self.images), self.num_examples)
        return self.rows.fetch(self.rows.arrays[0])[0]


@dataclasses.dataclass(frozen=True, eq=False)
class Streamed:
    """A source read batch by batch for one pass, never held whole (what `predict` does with a
    spec or a source; `prepare` instead keeps the decoded set for many passes).

    Attributes:
      source: the `ImageSource`.
      preprocessing: applied to every image (`prepare_for_eval` on the host, then normalised on
        the device).
      batch_size: global batch B.
      mesh: the data mesh.
    """

    source: Any
    preprocessing: preprocess.Preprocessing
    batch_size: int
    mesh: Mesh

    on_host = True

    @property
    def num_examples(self) -> int:
        return len(self.source)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.source.labels, np.int32)

    @property
    def num_batches(self) -> int:
        """The global steps of one pass, ceil(N / B) (the same on every process)."""
        return -(-len(self.source) // self.batch_size)

    def host_batches(self):
        """This process's slices of the global batches, as `image_batches.HostBatch`es."""
        for batch in pipeline.eval_dataset(
            self.source,
            self.preprocessing,
            global_batch=self.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ):
            valid = np.asarray(batch["valid"])
            yield image_batches.HostBatch(
                np.asarray(batch["image"]), np.asarray(batch["label"], np.int32), valid,
                int(valid.sum()), True,
            )  # fmt: skip


def stream(
    data,
    preprocessing: preprocess.Preprocessing,
    *,
    batch_size: int | None = None,
    mesh: Mesh | None = None,
    split: str | None = None,
    data_dir: str | None = None,
) -> Streamed:
    """A one-pass reader of `data` (spec, source or `(images, labels)`), checked now, read later."""
    mesh, batch_size = mesh_and_batch(mesh, batch_size)
    return Streamed(
        as_source(data, split=split, data_dir=data_dir), preprocessing, batch_size, mesh
    )


def default_batch_size(mesh: Mesh | None = None) -> int:
    """32 images per device of the mesh's 'data' axis."""
    mesh = sharding.data_mesh() if mesh is None else mesh
    return _PER_DEVICE_BATCH * sharding.data_parallel_size(mesh)


def prepare(
    data,
    preprocessing: preprocess.Preprocessing,
    *,
    batch_size: int | None = None,
    mesh: Mesh | None = None,
    placement: str = "auto",
    split: str | None = None,
    data_dir: str | None = None,
    progress: bool = True,
) -> Prepared:
    """Decodes and preprocesses an evaluation set once.

    Args:
      data: a data spec string (`jaxmodels.data.sources.open_source`), an `ImageSource`, a tuple
        `(images uint8 [N, H, W, 3], labels [N])`, or a `Prepared` (returned as is when its
        preprocessing, batch and mesh fit).
      preprocessing: the model's preprocessing (`jaxmodels.spec(...).preprocessing`).
      batch_size: global batch B (a multiple of the mesh's 'data' size); default 32 per device.
      mesh: a `Mesh` with a 'data' axis; default all devices.
      placement: 'device' keeps the uint8 images on the devices (sharded over the batch),
        'host' keeps this process's rows in host memory and streams them per pass, 'auto' picks
        'device' when each device's share is at most 2 GiB.
      split, data_dir: for spec strings (`open_source`).
      progress: show a progress bar on process 0.

    Returns:
      A `Prepared` set.

    Raises:
      jaxmodels.data.sources.DataError: the data cannot be read.
      ValueError: bad batch size, mesh or placement.
    """
    mesh, batch_size = mesh_and_batch(mesh, batch_size)
    if placement not in ("auto", "device", "host"):
        raise ValueError(f"placement must be 'auto', 'device' or 'host'; got {placement!r}")
    if isinstance(data, Prepared):
        if (
            data.preprocessing == preprocessing
            and data.batch_size == batch_size
            and data.mesh == mesh
            and (placement == "auto" or data.on_host == (placement == "host"))
        ):
            return data
        raise ValueError(
            "data is a Prepared set made with another preprocessing, batch size, mesh or "
            "placement; prepare the source again"
        )
    streamed = stream(data, preprocessing, batch_size=batch_size, mesh=mesh, split=split,
                      data_dir=data_dir)  # fmt: skip
    images = []
    with progress_bar(streamed.num_examples, progress, "prepare") as bar:
        for batch in streamed.host_batches():
            images.append(batch.images)
            bar.update(batch.count * jax.process_count())
    images_TLSS3 = np.stack(images)
    steps, local = images_TLSS3.shape[:2]
    source = streamed.source
    labels_N = np.asarray(source.labels, np.int32)
    fingerprint = f"{source.fingerprint}|{dataclasses.astuple(preprocessing)}"
    made = dict(
        labels=labels_N, num_examples=len(labels_N), preprocessing=preprocessing, mesh=mesh,
        fingerprint=fingerprint, batch_size=batch_size, num_batches=steps,
    )  # fmt: skip
    per_device = images_TLSS3.nbytes * jax.process_count() / mesh.size
    if placement == "host" or (placement == "auto" and per_device > _DEVICE_BYTES):
        return Prepared(images=images_TLSS3, rows=None, **made)
    labels_TL, valid_TL = local_layout(labels_N, steps, local)
    rows = row_batches.DeviceRows.in_batches(
        (images_TLSS3, labels_TL, valid_TL), len(labels_N), mesh
    )
    return Prepared(images=None, rows=rows, **made)


def as_source(data, *, split: str | None = None, data_dir: str | None = None):
    """An `ImageSource` from a spec string, a source, or `(images, labels)` arrays."""
    if isinstance(data, tuple) and len(data) == 2:
        return ArraySource(*data)
    if isinstance(data, np.ndarray | jax.Array):
        raise TypeError(
            "pass arrays with their labels as (images [N, H, W, 3], labels [N]); for "
            "preprocessed float images use jaxmodels.extract_features"
        )
    return data_lib.open_source(data, split=split, data_dir=data_dir)


def as_dataset(model, data, preprocessing, batch_size, mesh) -> Prepared | Streamed:
    """`data` as a `Prepared` set (kept) or a `Streamed` one (made here), checked against the model.

    Args:
      model: the module (its preprocessing is the default).
      data: a `Prepared` or `Streamed` set, a spec string, an `ImageSource` or `(images, labels)`.
      preprocessing: overrides the model's; must equal a given set's.
      batch_size, mesh: for sets made here.

    Raises:
      ValueError: `preprocessing` differs from the one `data` was prepared with.
      TypeError: no preprocessing given for a module that is not a jaxmodels architecture.
    """
    if isinstance(data, Prepared | Streamed):
        if preprocessing is not None and preprocessing != data.preprocessing:
            raise ValueError(
                f"data was prepared with {data.preprocessing}, not the given {preprocessing}"
            )
        return data
    if preprocessing is None:
        preprocessing = registry.spec_of(model).preprocessing
    return stream(data, preprocessing, batch_size=batch_size, mesh=mesh)


def mesh_and_batch(mesh, batch_size) -> tuple[Mesh, int]:
    """The mesh (default all devices) and global batch (default `default_batch_size`), checked."""
    mesh = sharding.data_mesh() if mesh is None else mesh
    sharding.check_data_mesh(mesh)
    batch_size = default_batch_size(mesh) if batch_size is None else batch_size
    sharding.check_batch_size(batch_size, mesh)
    return mesh, batch_size


def local_layout(labels_N: np.ndarray, steps: int, local: int):
    """This process's labels and valid flags in [T, L] layout (contiguous slices per batch)."""
    p, count = jax.process_index(), jax.process_count()
    batch = local * count
    rows_TL = np.arange(steps)[:, None] * batch + p * local + np.arange(local)[None, :]
    valid_TL = rows_TL < len(labels_N)
    labels_TL = np.where(valid_TL, labels_N[np.minimum(rows_TL, len(labels_N) - 1)], 0)
    return labels_TL.astype(np.int32), valid_TL


def gather_steps(local_steps: list[np.ndarray], num_examples: int) -> np.ndarray:
    """Per-step local rows [L, ...] of every process → [N, ...] in input order, every process."""
    rows_TBX = np.stack(local_steps)  # [T, L, ...]
    if jax.process_count() > 1:
        every_PTLX = np.asarray(multihost_utils.process_allgather(rows_TBX))
        rows_TPLX = np.moveaxis(every_PTLX, 0, 1)  # global batch t = process slices in order
        rows_TBX = rows_TPLX.reshape(rows_TPLX.shape[0], -1, *rows_TPLX.shape[3:])
    return rows_TBX.reshape(-1, *rows_TBX.shape[2:])[:num_examples]


def progress_bar(total, enabled: bool, desc: str):
    """A bar counting images, drawn on process 0 only, and only for work longer than 2 s."""
    return tqdm(
        total=total,
        unit="img",
        unit_scale=True,
        desc=desc,
        disable=not enabled or jax.process_index() != 0,
        smoothing=0.1,
        mininterval=1.0,
        leave=False,
        delay=2.0,  # work done within 2 s draws no bar (logs would keep its 0 %)
    )
