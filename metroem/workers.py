"""A stack on many workers: blocks of sections as tasks of python-task-queue.

``metroem align ... --block_size B`` splits the stack into blocks of ``B`` sections. The block
before ``z_start`` ends at the fixed reference ``z_start - 1``; every later block starts at the
last section of the block before it (its *reference*).

1. **Blocks** (independent tasks): block ``b`` is aligned as a stack (:mod:`metroem.stack`)
   onto its own raw reference, into the block's layers under the work folder.
2. **Stitching** (independent tasks, once every block is done): a section's whole field is
   its block field composed with its block reference's whole field, which is itself a chain
   of block-reference fields back to the fixed reference (:func:`metroem.fields.compose`,
   chunk by chunk). Each section is rendered once from its raw pixels into the output layers.
3. **Detrending** (only with ``--detrend_sections``; independent tasks, once every block is
   stitched): stitching wrote into work layers instead and kept each section's placement
   sums (:class:`metroem.detrend.AffineSums`); every block's sections get their fields with
   the stack's trend along z removed, rendered once from raw into the output layers.

With ``--queue URL`` the command only enqueues the block tasks and returns; ``metroem worker
URL`` runs tasks until the queue is empty (any number of workers, on any machines that see
the layers and the work folder). The worker that finishes the last block enqueues the
stitching tasks (and the last stitching task the detrending ones), once: a claim file in the
work folder keeps two workers that finish at the same moment from both inserting them. Every
task skips work it finds marked done, so a task that runs twice (a lease ran out, a worker was
killed) gives the same result. Without ``--queue`` the same tasks run in this process, in
order: the result is identical.

Queues are python-task-queue's (``fq:///path`` folder queues on one machine or a shared
disk, ``sqs://`` on a cluster); this module adds no scheduler of its own.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field

import torch

from metroem import defects, detrend, stack, tiling, volumes
from metroem.atomic import atomic_write_bytes
from metroem.devices import parse_devices
from metroem.errors import MetroemError

__all__ = ["StackJob", "enqueue", "run_local", "run_block", "stitch_block", "detrend_block",
           "work", "main"]

log = logging.getLogger(__name__)
JOB_FILE = "stack_job.json"


@dataclass
class StackJob:
    """Everything a worker needs to run one stack's tasks (stored as JSON in ``folder``)."""

    folder: str  # the work folder: job file, block layers, markers
    pyramid: str
    src_path: str
    z_start: int
    z_end: int
    field_path: str
    image_path: str
    block_size: int
    predecessors: int = 1
    aligner: dict = field(default_factory=dict)  # _as_aligner keyword arguments
    chunk: int = 1024
    pad: int | None = None
    device: str = "cpu"
    queue: str | None = None
    mask: dict | None = None  # a resolved metroem.defects.MaskLayer as a dict, or None
    misaligned_ratio: float = stack.MISALIGNED_RATIO  # blocks flag misaligned sections only
    detrend_sections: float | None = None  # sigma of metroem.detrend, or None: no detrending

    def blocks(self) -> list[tuple[int, list[int]]]:
        """``(reference, sections)`` of every block, in z order."""
        out, ref = [], self.z_start - 1
        while ref + 1 < self.z_end:
            secs = list(range(ref + 1, min(ref + 1 + self.block_size, self.z_end)))
            out.append((ref, secs))
            ref = secs[-1]
        return out

    def block_dir(self, b: int) -> str:
        return os.path.join(self.folder, "blocks", f"b{b}")

    def block_layer(self, b: int, kind: str) -> str:
        return volumes.normalize_path(os.path.join(self.block_dir(b), kind))

    def stitched_layer(self, kind: str) -> str:
        """Where stitching writes when the stack is detrended after (the work folder)."""
        return volumes.normalize_path(os.path.join(self.folder, "serial", kind))

    def save(self) -> None:
        atomic_write_bytes(os.path.join(self.folder, JOB_FILE),
                           (json.dumps(asdict(self), indent=1) + "\n").encode())

    @classmethod
    def load(cls, folder: str) -> StackJob:
        path = os.path.join(folder, JOB_FILE)
        try:
            with open(path) as f:
                return cls(**json.load(f))
        except FileNotFoundError:
            raise MetroemError(f"no stack job at {folder} ({JOB_FILE} is missing); enqueue it "
                               "again with metroem align ... --block_size B --queue URL") from None


class _Context:
    """Per process and job: the aligner, its tiler and the output writer (built once)."""

    _cache: dict[str, _Context] = {}

    def __init__(self, job: StackJob):
        from metroem import inference

        self.job = job
        info = volumes.volume_info(job.src_path)
        self.info = info
        self.devices = parse_devices(job.device)
        a = dict(job.aligner)
        if "finetune" in a:  # a job enqueued before refinement got its name
            raise MetroemError(f"the stack job in {job.folder} was enqueued by an older metroem "
                               "(aligner option finetune, now refine); enqueue it again")
        self.aligner, self.mip = inference.volume_aligner(
            job.pyramid, info, a.get("mip"), a.get("checkpoint_name"), a.get("stages"),
            self.devices[0], a.get("refine", False), a.get("refine_options"),
            a.get("smoothing_nm"), False, a.get("smoothing_gate"))
        h, w = info.size[self.mip][1], info.size[self.mip][0]
        self.tiler = tiling.StageTiler(self.aligner, h, w, job.chunk, job.pad)
        self.out = inference._VolumeWriter(info, self.mip, max(info.mips), job.field_path,
                                           job.image_path)
        self.stitched_out = inference._VolumeWriter(
            info, self.mip, self.mip, job.stitched_layer("field"), job.stitched_layer("image"))
        mask = defects.MaskLayer(**job.mask) if job.mask else None
        self.sections = inference._Sections(job.src_path, self.mip, mask)

    @classmethod
    def of(cls, folder: str) -> _Context:
        key = os.path.abspath(folder)
        if key not in cls._cache:
            cls._cache[key] = cls(StackJob.load(folder))
        return cls._cache[key]


def _job_markers(job: StackJob):
    """Markers of whole tasks: ``b<k>`` (block aligned), ``b<k>_stitched``."""
    from metroem.inference import _Markers

    return _Markers(os.path.join(job.folder, "blocks"))


def run_block(folder: str, b: int, progress: bool = False) -> None:
    """Task: align block ``b`` as a stack onto its raw reference, into the block's layers."""
    from metroem import inference

    ctx = _Context.of(folder)
    job = ctx.job
    done = _job_markers(job)
    if not done.done(f"b{b}"):
        ref, secs = job.blocks()[b]
        cxy = inference._chunk_xy(job.src_path)
        fpath, ipath = job.block_layer(b, "field"), job.block_layer(b, "image")
        inference._prepare_layer(fpath, ctx.info, cxy, "float32", 2, False, True)
        inference._prepare_layer(ipath, ctx.info, cxy, ctx.info.dtype, 1, False, True)
        out = inference._VolumeWriter(ctx.info, ctx.mip, ctx.mip, fpath, ipath)
        markers = inference._Markers(os.path.join(job.block_dir(b), "markers"))
        # a task that stopped would be retried forever: blocks flag misaligned sections only
        run = inference._Run(ctx.aligner, ctx.tiler, ctx.devices, markers, out, progress,
                             ctx.sections, job.misaligned_ratio, runaway_stop=0)
        _, _, skip = inference._align_stack(run, job.src_path, ref, secs, job.predecessors,
                                            detrended=job.detrend_sections is not None,
                                            whole_stack=False)
        for p in (fpath, ipath):
            volumes.forget(p)
        done.mark(f"b{b}", json.dumps(skip))  # no data or misaligned: not in a detrend fit
        log.info("block %d (z %d..%d onto %d) aligned", b, secs[0], secs[-1], ref)
    n = len(job.blocks())
    if job.queue and all(done.done(f"b{k}") for k in range(n)):
        _insert_phase(done, job.queue, "stitching", [_stitch_task(folder, k) for k in range(n)
                                                     if not done.done(f"b{k}_stitched")])


def _task(folder: str, key: str, needed: str, blocks_needed, missing_text: str):
    """A stitching or detrending task's start: its context, the job's markers and blocks, or
    ``(None, ...)`` when marker ``key`` says it is done; a one-line error when a block it
    needs (``blocks_needed``, default all) lacks marker ``needed.format(k)``."""
    ctx = _Context.of(folder)
    done = _job_markers(ctx.job)
    blocks = ctx.job.blocks()
    if done.done(key):
        return None, done, blocks
    ks = range(len(blocks)) if blocks_needed is None else blocks_needed
    missing = [k for k in ks if not done.done(needed.format(k))]
    if missing:
        raise MetroemError(f"block {missing[0]} {missing_text}")
    return ctx, done, blocks


def stitch_block(folder: str, b: int, progress: bool = False) -> None:
    """Task: whole fields of block ``b``'s sections (block field after the chain of block
    references' fields), rendered once from raw into the output layers."""
    from metroem import inference

    ctx, done, blocks = _task(folder, f"b{b}_stitched", "b{}", range(b + 1),
                              f"is not aligned yet; stitching needs blocks 0..{b} (run the "
                              "block tasks first)")
    if ctx is None:
        return
    job, mip, t = ctx.job, ctx.mip, ctx.tiler
    chain = [tiling.VolumeFieldStore(job.block_layer(k - 1, "field"), mip, blocks[k][0]).read
             for k in range(1, b + 1)]
    ref, secs = blocks[b]
    markers = inference._Markers(os.path.join(job.block_dir(b), "stitched"))
    # detrended after: into the work layers, each section's placement sums in the marker
    out = ctx.stitched_out if job.detrend_sections is not None else ctx.out

    def work(model, c: tiling.Chunk) -> None:
        sums: dict[str, list[float]] = {}

        def put(z: int, f, img) -> None:
            out.write(z, c, f, img)
            if job.detrend_sections is not None:
                sums[str(z)] = inference._placement_sums(f, img, c, t, ctx.info.dtype)

        g = torch.zeros(1, 2, c.h, c.w)
        for read in chain:
            g = tiling.compose_chunk(read, g, c)
        if b == 0:  # the fixed reference: copied, zero field
            src = ctx.sections.source(job.src_path, ref)
            put(ref, g, tiling.read_resampled(src, 0, c.y0, c.x0, c.h, c.w))
        for z in secs:
            own = tiling.VolumeFieldStore(job.block_layer(b, "field"), mip, z).read
            f = tiling.compose_chunk(own, g, c)
            src = ctx.sections.source(job.src_path, z)
            put(z, f, tiling.warp_chunk(src, f, c))
        markers.mark(str(c.index), json.dumps(sums) if sums else "")

    tiling.run_chunks(t.output_chunks(), work, ctx.aligner, ctx.devices,
                      is_done=lambda c: markers.done(str(c.index)), progress=progress,
                      desc=f"stitching block {b} (z {secs[0]}..{secs[-1]})")
    for p in (job.field_path, job.image_path):
        volumes.forget(p)
    done.mark(f"b{b}_stitched")
    n = len(blocks)
    if job.detrend_sections is not None and job.queue and all(
            done.done(f"b{k}_stitched") for k in range(n)):
        _insert_phase(done, job.queue, "detrending", [_detrend_task(folder, k) for k in range(n)
                                                      if not done.done(f"b{k}_detrended")])


def _placements(job: StackJob, height: int, width: int,
                chunks: list[tiling.Chunk]) -> tuple[list[int], list]:
    """Every section of the stack (the reference first) and its placement, from the stitching
    markers (``None`` for sections without data or found misaligned in their block)."""
    from metroem import inference

    done = _job_markers(job)
    blocks = job.blocks()
    skip = set()
    for k in range(len(blocks)):
        skip |= set(json.loads(done.payload(f"b{k}") or "[]"))
    order = [blocks[0][0]] + [z for _, secs in blocks for z in secs]
    total = {z: detrend.AffineSums(height, width) for z in order}
    for k in range(len(blocks)):
        markers = inference._Markers(os.path.join(job.block_dir(k), "stitched"))
        for c in chunks:
            text = markers.payload(str(c.index))
            for z, values in (json.loads(text) if text else {}).items():
                total[int(z)].merge(detrend.AffineSums.from_list(height, width, values))
    return order, [None if z in skip else total[z].placement() for z in order]


def detrend_block(folder: str, b: int, progress: bool = False) -> None:
    """Task (``--detrend_sections``): block ``b``'s sections (and the stack's reference with
    block 0) from the stitched work layers into the output layers, each field composed with
    its section's correction (:mod:`metroem.detrend`), rendered once from raw."""
    from metroem import inference

    ctx, done, blocks = _task(folder, f"b{b}_detrended", "b{}_stitched", None,
                              "is not stitched yet; detrending needs every block stitched "
                              "(run the stitching tasks first)")
    if ctx is None:
        return
    job, mip, t = ctx.job, ctx.mip, ctx.tiler
    order, placements = _placements(job, t.height, t.width, t.output_chunks())
    corr = dict(zip(order, detrend.corrections(placements, job.detrend_sections, 0, order,
                                               detrend.half_diagonal(t.height, t.width)),
                    strict=True))
    if b == 0:  # the whole stack's drift, once: before and after its trend is taken out
        inference._log_drift(order, placements, hint=False)
        inference._log_drift(order, [None if p is None else p @ corr[z]
                                     for z, p in zip(order, placements, strict=True)],
                             detrended=True)
    ref, secs = blocks[b]
    zs = ([ref] if b == 0 else []) + secs
    markers = inference._Markers(os.path.join(job.block_dir(b), "detrended"))
    field = job.stitched_layer("field")

    def work(model, c: tiling.Chunk) -> None:
        for z in zs:
            inference._write_detrended(ctx.out, z, c, ctx.sections.source(job.src_path, z),
                                       tiling.VolumeFieldStore(field, mip, z).read, corr[z], t)
        markers.mark(str(c.index))

    tiling.run_chunks(t.output_chunks(), work, ctx.aligner, ctx.devices,
                      is_done=lambda c: markers.done(str(c.index)), progress=progress,
                      desc=f"detrending block {b} (z {zs[0]}..{zs[-1]})")
    for p in (job.field_path, job.image_path):
        volumes.forget(p)
    done.mark(f"b{b}_detrended")
    if all(done.done(f"b{k}_detrended") for k in range(len(blocks))):
        for kind in ("field", "image"):  # every section is written: they have served
            inference._drop_layer(job.stitched_layer(kind))


# python-task-queue's registry: the functions a worker may run, by module and name.
def _register() -> None:
    from taskqueue import queueable

    queueable(run_block)
    queueable(stitch_block)
    queueable(detrend_block)


def _block_task(folder: str, b: int):
    from functools import partial

    return partial(run_block, folder, b)


def _stitch_task(folder: str, b: int):
    from functools import partial

    return partial(stitch_block, folder, b)


def _detrend_task(folder: str, b: int):
    from functools import partial

    return partial(detrend_block, folder, b)


QUEUE_SCHEMES = ("fq", "sqs")  # python-task-queue's folder and Amazon SQS queues


def _queue(url: str):
    try:
        from taskqueue import TaskQueue
    except ImportError as e:
        raise MetroemError("task queues need python-task-queue: pip install task-queue") from e
    scheme = url.split("://", 1)[0] if "://" in url else None
    if scheme not in QUEUE_SCHEMES:
        hint = f"; for the folder {url} pass fq://{os.path.abspath(url)}" if scheme is None else ""
        raise MetroemError(f"queue {url!r} is not a task queue URL: use fq:///path (a folder "
                           f"queue) or sqs://name (Amazon SQS){hint}")
    _register()
    try:
        return TaskQueue(url)
    except Exception as e:  # an unreachable queue is bad input, not a crash
        raise MetroemError(f"cannot open the task queue {url}: {str(e).splitlines()[0]}; check "
                           "the URL (fq:///path for a folder queue, sqs://name)") from None


def _insert(url: str, tasks: list) -> None:
    if tasks:
        _queue(url).insert(tasks)


def _insert_phase(done, url: str, phase: str, tasks: list) -> None:
    """Insert the tasks of the next ``phase`` once, however many workers finish the phase
    before at the same moment: the worker that creates the phase's claim file inserts them.
    (A worker killed between claim and insert leaves the phase to ``metroem align --queue``
    run again: :func:`enqueue` inserts whatever is not done, claims or not.)"""
    if not tasks:
        return
    claim = os.path.join(done.folder, f"{phase}.enqueued")
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    try:
        _insert(url, tasks)
    except BaseException:
        os.remove(claim)
        raise


def enqueue(job: StackJob) -> int:
    """Insert the block tasks that are not done yet (or, once every block is done, the
    stitching tasks, and once those are, the detrending ones); returns how many."""
    n = len(job.blocks())
    q = _queue(job.queue)
    done = _job_markers(job)
    blocks = [k for k in range(n) if not done.done(f"b{k}")]
    stitch = [k for k in range(n) if not done.done(f"b{k}_stitched")]
    if blocks:
        tasks = [_block_task(job.folder, k) for k in blocks]
    elif stitch or job.detrend_sections is None:
        tasks = [_stitch_task(job.folder, k) for k in stitch]
    else:
        tasks = [_detrend_task(job.folder, k) for k in range(n)
                 if not done.done(f"b{k}_detrended")]
    if tasks:
        q.insert(tasks)
    return len(tasks)


def run_local(job: StackJob, progress: bool = True) -> None:
    """Every task of ``job`` in this process, in order (what the workers would do)."""
    n = len(job.blocks())
    for b in range(n):
        run_block(job.folder, b, progress)
    for b in range(n):
        stitch_block(job.folder, b, progress)
    if job.detrend_sections is not None:
        for b in range(n):
            detrend_block(job.folder, b, progress)


def work(url: str, lease_seconds: int = 600) -> int:
    """Run tasks from queue ``url`` until it is empty; returns how many ran."""
    q = _queue(url)
    return q.poll(lease_seconds=lease_seconds, stop_fn=q.is_empty, verbose=False)


def build_parser():
    from metroem import cliargs

    p = cliargs.Parser(
        prog="metroem worker",
        description="run stack-alignment tasks from a queue until it is empty",
        epilog="example: metroem align --pyramid_path models/demo --src_path file:///v/image "
        "--z_start 1 --z_end 200 --field_path file:///v/field --image_path file:///v/aligned "
        "--block_size 16 --queue fq:///tmp/q   then, on each machine:   metroem worker "
        "fq:///tmp/q",
    )
    p.add_argument("queue", help="queue URL (fq:///path, sqs://name)")
    p.add_argument("--lease_seconds", type=int, default=600,
                   help="seconds a task is leased before another worker may take it "
                   "(default 600; longer than one block takes)")
    cliargs.add_common(p)
    return p


def main(argv: list[str] | None = None) -> int:
    from metroem.errors import cli_errors

    @cli_errors
    def run(argv):
        from metroem import cliargs

        a = cliargs.parse_args(build_parser(), argv, announce_threads=True)
        url = a.queue
        if url.startswith("fq://") and not os.path.isdir(url[len("fq://"):]):
            raise MetroemError(f"queue {url} does not exist; enqueue a stack first (metroem "
                               "align ... --block_size B --queue URL)")
        n = work(url, a.lease_seconds)
        log.info("done: %d task(s) run; the queue is empty", n)
        return 0

    return run(argv)
