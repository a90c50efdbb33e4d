"""Cut whole layers out of a safetensors checkpoint folder without loading the model.

The entry point. Python plans (plan.py: which tensors survive, their new names, shard names, index, config, model
card); the C++ engine in csrc/surgery/ validates every header and moves the bytes. Memory stays at the largest header plus a
fixed copy buffer, whatever the model's size.

Two modes:
- copy (`out=`, cut_copy.py): the source is only read; the result is assembled in a hidden folder beside OUT_DIR and renamed into
  place at the end, so an error never leaves a half-written OUT_DIR.
- in place (cut_in_place.py): a journal holding the whole plan is fsynced before anything is touched, and every step can be replayed,
  so rerunning the same command after a crash at any point finishes the job. See docs/surgery.md.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from .cut_copy import _cut_copy
from .cut_in_place import _already_done, _cut_in_place
from .plan import CONFIG_NAME, CUT_RECORD_KEY, JOURNAL_NAME, CutResult, build_plan, check_structure
from .untrusted import SurgeryError

__all__ = ["CONFIG_NAME", "CUT_RECORD_KEY", "JOURNAL_NAME", "CutResult", "SurgeryError", "build_plan",
           "check_structure", "cut_checkpoint"]


def cut_checkpoint(
    src: Union[str, os.PathLike],
    layers: Union[str, Sequence[int]],
    out: Union[str, os.PathLike, None] = None,
    in_place: bool = False,
    verify: bool = False,
    copy_method: str = "auto",
    check: bool = True,
    chosen_by: str = "manual",
    extra_files: Optional[Mapping[str, bytes]] = None,
) -> CutResult:
    """Remove whole layers from a safetensors checkpoint folder without loading the model.

    Args:
        src: folder holding config.json and either model.safetensors or model.safetensors.index.json plus shards.
        layers: indices to remove (original numbering), as ints or a string like "21,22,25" or "21-25".
        out: copy mode: a new (or empty) folder for the result; `src` is only read.
        in_place: edit `src` itself, crash-safely (see docs/surgery.md). Exactly one of `out` / `in_place`.
        verify: reopen the result with the safetensors library and check every kept tensor's bytes.
        copy_method: "auto" (reflink, then copy_file_range, then read/write), "copy_file_range" or "readwrite".
        check: before writing anything, prove that the pruned config builds the original model minus the removed
            blocks and that the renamed tensors fit it (surgery/verify_structure.py); refuse otherwise.
        chosen_by: what picked the layers (a metric such as "bi", or "manual"), recorded in the model card.
        extra_files: copy mode only: more files (name -> bytes, e.g. a score report) written into the result before
            it is published, so they appear together with it or not at all.

    Returns:
        CutResult with the removed layers, the old->new index map, the output folder, bytes copied and timing.

    Raises:
        SurgeryError: one-line reason and fix for any refused or failed cut.
    """
    start = time.perf_counter()
    src = Path(src)
    if (out is None) == (not in_place):
        raise SurgeryError("pass exactly one of --out OUT_DIR (copy) or --in-place")
    if extra_files and in_place:
        raise SurgeryError("extra_files are written with a copy (out=); an in-place cut adds no files")
    if copy_method not in ("auto", "copy_file_range", "readwrite"):
        raise SurgeryError(f"copy_method must be auto, copy_file_range or readwrite, not {copy_method!r}")
    if in_place:
        if not src.is_dir():
            raise SurgeryError(f"{src} is not a directory; pass the checkpoint folder that holds config.json")
        plan, copied, written, resumed = _cut_in_place(src, layers, verify, copy_method, chosen_by, check)
        if plan is None:
            record = _already_done(src, layers)
            gone = set(record["removed"])
            mapping = {old: new for new, old in enumerate(i for i in range(record["num_layers"]) if i not in gone)}
            return CutResult(removed=record["removed"], index_map=mapping, output=src, bytes_copied=0,
                             shards_written=0, seconds=time.perf_counter() - start, in_place=True,
                             copy_method=copy_method, already_done=True, num_layers=record["num_layers"])
        output, method = src, copy_method
    else:
        if os.path.lexists(src / JOURNAL_NAME):
            raise SurgeryError(f"{src} is in the middle of an interrupted in-place cut; rerun that command with "
                               "--in-place to finish it before copying")
        plan = build_plan(src, layers, chosen_by)
        if check:
            check_structure(src, plan)
        output = Path(out)
        copied, written, method = _cut_copy(src, output, plan, verify, copy_method, extra_files or {})
        resumed = False
    return CutResult(
        removed=plan.removed,
        index_map=plan.mapping,
        output=output,
        bytes_copied=copied,
        shards_written=written,
        seconds=time.perf_counter() - start,
        in_place=in_place,
        copy_method=method,
        verified=verify,
        resumed=resumed,
        num_layers=plan.num_layers,
    )
