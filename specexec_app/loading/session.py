"""Assembling a target, a drafter and a tokenizer from what the user named."""

from __future__ import annotations

from collections.abc import Callable, Iterator
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from drafts import Drafter, ModelDrafter, NgramDrafter
from drafts.model import cpu_draft_threads, keep_freed_memory
from drafts.chain import NoDraft
from drafts.distilled import is_distilled, load_draft

from specexec_app.core import engine
from specexec_app.errors import UserError
from specexec_app.core.text import encode_chat
from specexec_app.core.lm import DEFAULT_CONTEXT, ROWS_ALONE, Target, model_device
from specexec_app.loading.checkpoint import check_checkpoint
from specexec_app.loading.hf import (WEIGHTLESS, check_same_tokenizer, draft_gpu_bytes,
                                     load_model, load_tokenizer, stop_ids)
from specexec_app.loading.sources import Status, _quiet, resolve
from specexec_app.config.settings import DecodeSettings, LoadSpec, check_device, device_kind
from specexec_app.config.settings import resolve as resolve_settings

SELF_DRAFTS = {"self-int8": "int8", "self-nf4": "nf4"}
WORK_MARGIN = 256 * 2**20  # GPU memory kept beside the planned tensors: allocator slack, workspaces
OnLayer = Callable[[int, int], None]  # (layers placed, layers in all)


@dataclass
class Pipeline:
    target: Target
    drafter: Drafter
    tokenizer: object
    stop_ids: set[int]
    target_name: str
    draft_name: str
    source: object = None  # the target's ModelSource
    load_s: float = 0.0    # seconds that loading took

    def encode(self, prompt: str, raw: bool = False, system: str | None = None) -> list[int]:
        if not prompt.strip():
            raise UserError("the prompt is empty")
        if raw:
            return self.tokenizer(prompt).input_ids
        return self.encode_chat(([{"role": "system", "content": system}] if system else [])
                                + [{"role": "user", "content": prompt}])

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return encode_chat(self.tokenizer, messages, self.target_name)

    def vocab_size(self) -> int:
        """Token ids a drafter may propose: those of the tokenizer that the target also has."""
        return min(len(self.tokenizer), self.target.model.config.vocab_size)

    def placement_text(self) -> str:
        if self.target.placement is None:
            from offload.kernels import KernelLinear

            model = self.target.model
            text = f"resident on {self.target.device}"
            if not any(isinstance(m, KernelLinear) for m in model.modules()):
                return text
            from offload import native

            if not getattr(model, ROWS_ALONE, False):  # (no lean forward: no fused steps)
                return text + ", packed CPU kernels"
            if native.library() is not None:
                return text + ", packed CPU kernels, fused C steps"
            return text + f", packed CPU kernels (no fused C steps: {native.why()})"
        from offload.model import describe

        return describe(self.target.placement)

    def generate(self, prompt_ids: list[int], settings: DecodeSettings) -> Iterator:
        return engine.generate(self.target, self.drafter, prompt_ids, settings, self.tokenizer,
                               self.stop_ids)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device(device_kind(name))
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(check_device(name))


def _load_target(src, dev: torch.device, offload: str, quant: int | None, gpu_memory: int | None,
                 status: Status, progress: OnLayer | None, draft_bytes: int,
                 trust_remote_code: bool, context: int, tree_budget: int):
    """The target, resident where it fits, else with its decoder layers streamed (offload/);
    `draft_bytes` of the device are left to the draft, and room is kept for a `context`-token
    KV cache and `tree_budget`-node trees. A checkpoint is read layer by layer as it is placed
    (never held whole in RAM, nor expanded to 16 bits): a safetensors folder, a folder of
    `specexec quantize`, a GGUF file (its blocks stay packed; on a CPU the packed kernels compute
    from them). `quant` None: the weights as the checkpoint stores them (16 bits for a float
    one); 16 with a GGUF: its blocks expanded at load. Returns (model, offloaded): the
    `offload.Offloaded` placement and streamer, or None when the whole model is resident."""
    from offload.loader import load_offloaded
    from offload.packed import is_packed

    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    if not src.gguf_file and quant is None:
        quant = 16
    if offload == "never" and quant == 16 and not is_packed(src.path) and not src.gguf_file:
        return load_model(src, dev, dtype=dtype, trust_remote_code=trust_remote_code), None
    # The draft when it shares the device, and what the allocator and CUDA's workspaces take.
    reserve = WORK_MARGIN + draft_bytes if dev.type == "cuda" else 0
    work = dict(context=context, tree_budget=tree_budget)
    if src.gguf_file:
        from offload.gguf import load_gguf

        from specexec_app.loading.sources import gguf_meta_dir

        meta = gguf_meta_dir(src, status)
        status(f"loading {src.name} layer by layer from GGUF")
        loaded = load_gguf(src.gguf_path, meta, dev, quant, offload, gpu_memory, reserve, dtype,
                           progress, **work)
    else:
        check_checkpoint(Path(src.path))
        status(f"loading {src.name} layer by layer")
        loaded = load_offloaded(Path(src.path), dev, quant, offload, gpu_memory, reserve, dtype,
                                progress, trust_remote_code, **work)
    placement = loaded.placement
    if placement.streamed_layers == 0 and placement.quant == 16 and loaded.workspace is None:
        return loaded.model, None  # all of it resident in its own dtype: nothing offloaded
    return loaded.model, loaded


def build(spec: LoadSpec, status: Status = _quiet, progress: OnLayer | None = None) -> Pipeline:
    """The pipeline for a resolved load spec (`config.settings.resolve`): names and a tokenizer
    mismatch are refused before any weights load; the target is placed with room for a
    `spec.context`-token KV cache and `spec.budget`-node trees; `progress(done, total)` follows
    the placing of its layers."""
    started = time.perf_counter()
    context = spec.context or DEFAULT_CONTEXT
    dev = pick_device(spec.device)
    if spec.threads:  # process-wide; a CPU draft beside a GPU sets its own below
        torch.set_num_threads(spec.threads)
    if spec.drafter == "gpu" and dev.type != "cuda":
        raise UserError("--drafter gpu: the target runs on the CPU here (no CUDA GPU in use)")
    ddev = torch.device("cpu") if spec.drafter == "cpu" else dev
    draft = spec.draft
    src = resolve(spec.target, status)
    dsrc = None if draft in WEIGHTLESS or draft in SELF_DRAFTS else resolve(draft, status)
    status(f"loading {spec.target}")
    tokenizer = load_tokenizer(src, spec.trust_remote_code, status)
    if dsrc:
        check_same_tokenizer(tokenizer, load_tokenizer(dsrc, spec.trust_remote_code, status))
    on_device = draft_gpu_bytes(draft, src, dsrc, context + 2 * spec.budget) if ddev.type == "cuda" else 0
    model, offloaded = _load_target(src, dev, spec.offload, spec.quant, spec.gpu_memory, status,
                                    progress, on_device, spec.trust_remote_code, context,
                                    spec.budget)
    stops = stop_ids(tokenizer, model)
    vocab = min(len(tokenizer), model.config.vocab_size)
    drafter = make_drafter(draft, dsrc, src, model, ddev, vocab, stops, spec.trust_remote_code,
                           status)
    return Pipeline(Target(model, spec.target, context, offloaded=offloaded), drafter, tokenizer,
                    stops, spec.target, draft, src, time.perf_counter() - started)


def build_named(target: str = "default", draft: str | None = None, **options) -> Pipeline:
    """The pipeline for names as a user would give them (presets and defaults resolved as for
    `specexec run`, without the saved profile): for scripts and tests."""
    return build(resolve_settings(dict(target=target, draft=draft, **options)).load)


def self_draft_model(src, dev: torch.device, kind: str, trust_remote_code: bool = False):
    """A quantized copy ("int8" or "nf4") of the target in `src` on `dev`: bitsandbytes' for a
    checkpoint folder; for a GGUF (which bitsandbytes cannot quantize on load) its blocks
    expanded, then its layers packed by `offload` (on a CPU, int8 runs on the packed kernels)."""
    from offload.model import offload_model, plan_placement

    if not src.gguf_file:
        return load_model(src, dev, quant=kind, trust_remote_code=trust_remote_code)
    model, _ = _load_target(src, dev, "never", 16, None, _quiet, None, 0, trust_remote_code, 0, 1)
    bits = 8 if kind == "int8" else 4
    placement = plan_placement(model, dev, bits, "never", dtype=model.dtype)
    return offload_model(model, dev, placement, model.dtype).model


def make_drafter(draft: str, dsrc, src, model, ddev: torch.device, vocab: int, stops: set[int],
                 trust_remote_code: bool = False, status: Status = _quiet) -> Drafter:
    """The drafter named `draft` (its model from `dsrc`) for the target `model` loaded from `src`."""
    if draft == "none":
        return NoDraft()  # the target alone, one token a pass
    if draft == "ngram":
        # On a CPU a pass carrying a tree costs ~1.4x a one-token pass (gemm against gemv), so
        # only matches of 3+ tokens earn a tree there; on a GPU the pass is flat in tree size.
        return NgramDrafter(min_ngram=3 if model_device(model).type == "cpu" else 1)
    if draft in SELF_DRAFTS:
        status(f"quantizing a {SELF_DRAFTS[draft]} copy of the target as the draft")
        dmodel = self_draft_model(src, ddev, SELF_DRAFTS[draft], trust_remote_code)
    elif is_distilled(dsrc.path):
        status(f"loading draft {draft} (shares the target's embedding and head)")
        dmodel = load_draft(dsrc.path, model, ddev)
    else:
        status(f"loading draft {draft}")
        dmodel = load_model(dsrc, ddev, trust_remote_code=trust_remote_code)
        vocab = min(vocab, dmodel.config.vocab_size)
    # A draft on the CPU beside a target on a GPU: threads of its own, cores left to the thread
    # that feeds the GPU and to the disk readers.
    beside_gpu = ddev.type == "cpu" and model_device(model).type == "cuda"
    if ddev.type == "cpu":
        keep_freed_memory()
    return ModelDrafter(dmodel, vocab, stop_ids=frozenset(stops),
                        threads=cpu_draft_threads() if beside_gpu else None)
