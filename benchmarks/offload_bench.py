"""Streaming speed of the offloaded target against accelerate's CPU offload, on real shapes.

Builds random-weight decoder stacks with the shapes of real models (no hub), keeps every decoder
layer in host RAM, and times, in one run: the pinned and pageable host-to-device peaks; one pass
of our streamed target (16-bit and 4-bit) for tree sizes 1..4096; the same layers through
accelerate's `dispatch_model` CPU offload. A model with fewer layers than the real one is timed
and the per-layer figures are scaled to the real depth (said in the output).

    python benchmarks/offload_bench.py --shape llama-2-70b --layers 8 --out bench-out
    python benchmarks/offload_bench.py --shape tiny --device cpu      # a logic check on CPU

With `--disk DIR` the same model is also written to DIR (16-bit safetensors, and 4-bit packed by
`specexec quantize`'s writer) and streamed from there (`--offload disk`): every pass reads the
layers from the files, through the pinned staging ring, with the page cache dropped before each
pass; the cold read speed of the files is the peak to compare with.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from offload import offload_model, plan_placement
from offload.loader import load_offloaded
from offload.model import describe
from offload.roundtrips import RoundTrips
from offload.packed import save_packed
from offload.store import disk_readers
from specexec_app.core.kvcache import TokenCache
from specexec_app.core.lm import forward_tree
from specexec_app.core.tree import chain
from specexec_app.tools.machine import disk_read_gb_s, drop_page_cache, host_to_device_gb_s

SHAPES = {  # hidden, intermediate, heads, kv heads, layers, vocab
    "llama-2-70b": (8192, 28672, 64, 8, 80, 32000),
    "llama-3-70b": (8192, 28672, 64, 8, 80, 128256),
    "qwen2.5-32b": (5120, 27648, 40, 8, 64, 152064),
    "tiny": (256, 768, 4, 2, 8, 1024),
}


def build(shape: str, layers: int, dtype: torch.dtype) -> tuple[LlamaForCausalLM, int]:
    hidden, inter, heads, kv, real_layers, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, num_hidden_layers=layers, vocab_size=vocab,
                      max_position_embeddings=8192, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model, real_layers


def time_pass(model, n: int, device, repeats: int, before=None) -> float:
    prompt = list(range(10, 42))
    times = []
    for _ in range(repeats + 1):
        if before:
            before()
        kv = TokenCache()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        forward_tree(model, kv, prompt, chain([100 + i % 500 for i in range(n)]))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[len(times[1:]) // 2]  # median, first run is warm-up


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-2-70b", choices=SHAPES)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--sizes", default="1,64,256,1024,2048,4096")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-accelerate", action="store_true")
    ap.add_argument("--disk", type=Path, default=None,
                    help="also stream from files written to this folder (needs room for them)")
    ap.add_argument("--disk-sizes", default="1,2048")
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    sizes = [int(s) for s in args.sizes.split(",")]
    result: dict = dict(shape=args.shape, layers_timed=args.layers, date=str(datetime.date.today()),
                        machine=f"{platform.node()} {psutil.cpu_count()} cores "
                                f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
                        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "none")
    if device.type == "cuda":
        result["h2d_pinned_GBps"] = host_to_device_gb_s(device, pinned=True, size=1 << 30)
        result["h2d_pageable_GBps"] = host_to_device_gb_s(device, pinned=False, size=1 << 30)
        print(f"host->device: pinned {result['h2d_pinned_GBps']:.1f} GB/s, pageable "
              f"{result['h2d_pageable_GBps']:.1f} GB/s", flush=True)

    for quant in (16, 8, 4):
        model, real_layers = build(args.shape, args.layers, dtype)
        # Planned for the 32-token prompt of time_pass and the largest tree.
        placement = plan_placement(model, device, quant, offload="always", gpu_memory=None,
                                   dtype=dtype, context=32, tree_budget=max(sizes))
        placement = placement.__class__(**{**placement.__dict__, "resident_layers": 0,
                                           "streamed_layers": args.layers})
        planned = placement.device_bytes
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        offloaded = offload_model(model, device, placement, dtype=dtype)
        streamer = offloaded.streamer
        time_pass(model, min(sizes), device, 1)  # warm: lookup tables, allocator
        with RoundTrips(model) as trips:  # one pass: a 32-token prompt and a chain
            forward_tree(model, TokenCache(), list(range(10, 42)), chain([100 + i for i in range(8)]))
        bus = dict(bytes_per_pass=offloaded.streamed_bytes_per_pass,
                   planned_bytes_per_pass=placement.streamed_layers * placement.packed_layer_bytes,
                   pinned_bytes=offloaded.pinned_bytes, workspace_bytes=
                   offloaded.workspace.nbytes if offloaded.workspace else 0,
                   round_trips_in_layers=trips.total_inside, round_trips_per_pass=trips.total)
        print(f"ours {quant:>2}-bit: {bus['bytes_per_pass'] / 2**30:.3f} GiB cross per pass "
              f"(plan {bus['planned_bytes_per_pass'] / 2**30:.3f}), pinned "
              f"{bus['pinned_bytes'] / 2**30:.3f} GiB, dequant workspace "
              f"{bus['workspace_bytes'] / 2**20:.0f} MiB, host round trips per pass "
              f"{bus['round_trips_per_pass']} ({bus['round_trips_in_layers']} in the layers: "
              f"{dict(trips.inside)}; outside: {dict(trips.outside)})", flush=True)
        rows = []
        for n in sizes:
            before = streamer.bytes_streamed
            s = time_pass(model, n, device, args.repeats)
            per_pass_bytes = (streamer.bytes_streamed - before) / (args.repeats + 1)
            per_layer = s / args.layers
            row = dict(tree=n, pass_s_timed=s, layer_ms=per_layer * 1000,
                       pass_s_full_depth=per_layer * real_layers,
                       GBps=per_pass_bytes / s / 1e9 if device.type == "cuda" else None)
            if "h2d_pinned_GBps" in result and row["GBps"]:
                row["fraction_of_pinned_peak"] = row["GBps"] / result["h2d_pinned_GBps"]
            rows.append(row)
            print(f"ours {quant:>2}-bit tree {n:>5}: {per_layer * 1000:7.2f} ms/layer, "
                  f"{per_layer * real_layers:6.2f} s/pass at {real_layers} layers"
                  + (f", {row['GBps']:.1f} GB/s" if row["GBps"] else ""), flush=True)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        result[f"ours_{quant}bit"] = dict(placement=describe(placement), rows=rows, **bus,
                                          peak_gpu_bytes=peak, planned_gpu_bytes=planned,
                                          rss_bytes=psutil.Process().memory_info().rss)
        if peak is not None:
            print(f"ours {quant:>2}-bit GPU memory: peak {peak / 2**30:.2f} GiB, placement planned "
                  f"{planned / 2**30:.2f} GiB ({'within' if peak <= planned else 'OVER'})", flush=True)
        del model, streamer, offloaded

    if not args.skip_accelerate and device.type == "cuda":
        from accelerate import dispatch_model

        model, real_layers = build(args.shape, args.layers, dtype)
        device_map = {"model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
        device_map.update({f"model.layers.{i}": "cpu" for i in range(args.layers)})
        model = dispatch_model(model, device_map=device_map)
        rows = []
        for n in [s for s in sizes if s <= 512] or sizes[:1]:
            s = time_pass(model, n, device, args.repeats)
            rows.append(dict(tree=n, layer_ms=s / args.layers * 1000,
                             pass_s_full_depth=s / args.layers * real_layers))
            print(f"accelerate tree {n:>5}: {s / args.layers * 1000:7.2f} ms/layer", flush=True)
        result["accelerate_16bit"] = rows

    if args.disk:
        bench_disk(args, device, dtype, result)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"offload_{args.shape}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


def drop_folder_cache(folder: Path) -> None:
    """Every pass then reads the disk, as on a machine whose RAM cannot cache the model."""
    for path in folder.rglob("*"):
        if path.is_file():
            drop_page_cache(path)


def bench_disk(args, device: torch.device, dtype: torch.dtype, result: dict) -> None:
    import os

    model, _ = build(args.shape, args.layers, dtype)
    plain, packed = args.disk / f"{args.shape}-16bit", args.disk / f"{args.shape}-4bit"
    print(f"writing {plain} and {packed}", flush=True)
    model.save_pretrained(plain, safe_serialization=True)
    save_packed(plain, packed, 4, dtype)
    plans = {quant: plan_placement(model, device, quant, offload="disk", gpu_memory=1 << 50,
                                   dtype=dtype) for quant in (16, 4)}
    del model
    os.sync()  # written pages are clean: they can be dropped from the page cache
    for quant, folder in ((16, plain), (4, packed)):
        peak, cold = disk_read_gb_s(folder / "layers" if quant == 4 else folder,
                                    disk_readers(device), limit=8 * 2**30)
        # A budget that keeps no decoder layer resident (a resident 4-bit layer stays packed, so
        # the budget is below one packed layer beyond the buffers): all of them stream.
        p = plans[quant]
        budget = p.fixed_bytes + p.work_bytes + 2**28 + 2 * p.packed_layer_bytes \
            + p.resident_layer_bytes // 2 if device.type == "cuda" else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        offloaded = load_offloaded(folder, device, 16, "disk", budget, 0, dtype)
        loaded, streamer, placement = offloaded.model, offloaded.streamer, offloaded.placement
        assert placement.resident_layers == 0, describe(placement)  # every layer is read
        rows = []
        for n in [int(x) for x in args.disk_sizes.split(",")]:
            before = streamer.bytes_streamed
            s = time_pass(loaded, n, device, args.repeats, before=lambda: drop_folder_cache(folder))
            gbps = (streamer.bytes_streamed - before) / (args.repeats + 1) / s / 1e9
            rows.append(dict(tree=n, pass_s_timed=s, layer_ms=s / placement.streamed_layers * 1000,
                             GBps=gbps, fraction_of_disk_peak=gbps / peak if peak else None))
            print(f"disk {quant:>2}-bit tree {n:>5}: {s / placement.streamed_layers * 1000:7.2f} "
                  f"ms/layer, {gbps:.2f} GB/s read (files read {'cold' if cold else 'maybe cached'}"
                  f" at {peak:.2f} GB/s)", flush=True)
        result[f"disk_{quant}bit"] = dict(
            placement=describe(placement), disk_read_GBps=peak, cold=cold, rows=rows,
            peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            rss_bytes=psutil.Process().memory_info().rss)
        del loaded, streamer, offloaded


if __name__ == "__main__":
    main()
