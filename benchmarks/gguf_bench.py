"""A GGUF Q4_K_M target on real shapes: memory at load, bytes per layer, dequant against copy.

Writes a stack of Llama-3-70B-shaped decoder layers (hidden 8192, intermediate 28672, 64 heads,
8 KV heads) as GGUF with random blocks in Q4_K_M's types (Q4_K for Q, K, O, gate, up; Q6_K for
V and down), then, in a fresh process, loads it as our streamed target (`offload.gguf`) and
reports:
- the peak RSS of that process against the file's bytes plus two layers (the bound: no layer is
  ever expanded in RAM);
- the bytes of a layer that cross to the device against the GGUF tensor bytes of that layer;
- the time to dequantize one layer (its seven matrices, one at a time into the workspace, as a
  pass does) on this machine's device against the time to copy the layer's bytes there (on a
  CPU: a memcpy of the packed bytes; on a GPU: the pinned host-to-device copy), and the same
  with diffusers' GGUF dequantizers when diffusers is installed (their correctness against the
  `gguf` package's numpy code is printed beside).

    python benchmarks/gguf_bench.py --layers 2 --dir /tmp/gguf-bench
    python benchmarks/gguf_bench.py --device cuda ...     # on a GPU machine
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

HIDDEN, INTER, HEADS, KV_HEADS = 8192, 28672, 64, 8
TYPES = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K",
         "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"}
SHAPES = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (HIDDEN // HEADS * KV_HEADS, HIDDEN),
          "attn_v": (HIDDEN // HEADS * KV_HEADS, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
          "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}
F16_AT = {"Q4_K": [0, 2], "Q6_K": [208]}


def blocks(qtype: str, rows: int, cols: int, rng) -> np.ndarray:
    """Random blocks [rows, row bytes] with small finite float16 scales."""
    from offload.quant import GGUF_TYPES

    block, size, _ = GGUF_TYPES[qtype]
    data = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for at in F16_AT[qtype]:
        data[:, at:at + 2] = (np.abs(rng.standard_normal(len(data))) * 1e-4).astype(
            np.float16).view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, -1)


def write(path: Path, layers: int, vocab: int) -> dict:
    from gguf import GGMLQuantizationType, GGUFWriter

    rng = np.random.default_rng(0)
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(layers)
    writer.add_context_length(8192)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    sizes = {}

    def add(name, data, qtype):
        writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[qtype])
        sizes[name] = data.nbytes

    add("token_embd.weight", blocks("Q4_K", vocab, HIDDEN, rng), "Q4_K")
    for i in range(layers):
        for key, (rows, cols) in SHAPES.items():
            add(f"blk.{i}.{key}.weight", blocks(TYPES[key], rows, cols, rng), TYPES[key])
        for norm in ("attn_norm", "ffn_norm"):
            add(f"blk.{i}.{norm}.weight", np.ones(HIDDEN, dtype=np.float32), "F32")
    add("output_norm.weight", np.ones(HIDDEN, dtype=np.float32), "F32")
    add("output.weight", blocks("Q6_K", vocab, HIDDEN, rng), "Q6_K")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sizes


def config_dir(folder: Path, layers: int, vocab: int) -> Path:
    from transformers import LlamaConfig

    out = folder / "config"
    LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, num_hidden_layers=layers, vocab_size=vocab,
                rope_theta=500000.0, tie_word_embeddings=False).save_pretrained(out)
    return out


def load_child(path: Path, config: Path, device: str) -> None:
    """In a fresh process: load the target, then print its figures as JSON (peak RSS included)."""
    from offload.gguf import load_gguf

    dev = torch.device(device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    t = time.perf_counter()
    off = load_gguf(path, config, dev, None, "always", None, 0, dtype, context=0)
    load_s = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    layer = off.streamer.layers[0]
    fixed = sum(p.numel() * p.element_size() for n, p in off.model.named_parameters()
                if not n.startswith("model.layers.") and p.device.type != "meta")
    print(json.dumps(dict(peak_rss=peak, load_s=load_s, layer_bytes=layer.nbytes,
                          per_pass=off.streamed_bytes_per_pass, fixed_dense_bytes=fixed,
                          placement=off.placement.weights)))


def time_dequant(path: Path, config: Path, device: torch.device, repeats: int) -> dict:
    """One layer's seven matrices dequantized one at a time into the workspace, against a copy
    of the layer's bytes; diffusers' dequantizers on the same bytes when installed."""
    from gguf import GGMLQuantizationType, quants

    from offload.gguf import GGUFModel
    from offload.quant import prepare
    from offload.roundtrips import RoundTrips
    from offload.store import materialize

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    gguf = GGUFModel(path)
    names = [(f"blk.0.{k}.weight", k, 0) for k in SHAPES]
    disk = gguf.layer(names, dtype)
    host = torch.empty(disk.nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    disk.read_into(host)
    buffer = host.to(device)
    prepare(device)
    work = torch.empty(max(e.numel for e in disk.entries), dtype=dtype, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    def ours():
        for e in disk.entries:
            materialize(e, buffer, work[:e.numel].view(e.shape))

    def copy():
        if device.type == "cuda":
            buffer.copy_(host, non_blocking=True)
        else:
            buffer.copy_(host.clone())

    with RoundTrips() as trips:
        ours()
    result = dict(dequant_s=timed(ours), copy_s=timed(copy), dequant_round_trips=trips.total)
    # exactness of ours and diffusers' against the gguf package on the first rows of each type
    from offload.store import _view

    checks = {}
    for e in disk.entries[2:4]:  # attn_v (Q6_K), attn_output (Q4_K)
        qtype = e.meta[0]
        raw = _view(buffer, e.parts[0]).view(e.shape[0], -1)[:64].cpu().numpy()
        want = quants.dequantize(raw, GGMLQuantizationType[qtype]).astype(np.float32)
        got = torch.empty(64, e.shape[1])
        from offload.quant import dequant_gguf
        from types import SimpleNamespace

        dequant_gguf([torch.from_numpy(raw).reshape(-1)], SimpleNamespace(meta=(qtype, 0), shape=(64, e.shape[1])), got)
        checks[f"ours_{qtype}_max_abs_err"] = float(np.abs(got.numpy() - want).max())
        try:
            from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES, dequantize_functions
        except ImportError:
            continue
        kind = GGMLQuantizationType[qtype]
        block, size = GGML_QUANT_SIZES[kind]
        fn = dequantize_functions[kind]
        theirs = fn(torch.from_numpy(raw).reshape(-1, size), block, size).reshape(64, -1).float()
        checks[f"diffusers_{qtype}_max_abs_err"] = float(np.abs(theirs.numpy() - want).max())
    result.update(checks)
    try:
        from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES, dequantize_functions

        def diffusers():
            for e in disk.entries:
                kind = GGMLQuantizationType[e.meta[0]]
                block, size = GGML_QUANT_SIZES[kind]
                data = _view(buffer, e.parts[0]).view(-1, size)
                work[:e.numel].copy_(dequantize_functions[kind](data, block, size, dtype).reshape(-1))

        with RoundTrips() as trips:
            diffusers()
        result.update(diffusers_dequant_s=timed(diffusers), diffusers_round_trips=trips.total)
    except ImportError:
        pass
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000, help="128256 for Llama 3's (more RAM)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/gguf-bench"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        load_child(Path(args.child[0]), Path(args.child[1]), args.child[2])
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    path = args.dir / f"llama3-70b-shaped-{args.layers}L-Q4_K_M.gguf"
    t = time.perf_counter()
    sizes = write(path, args.layers, args.vocab)
    config = config_dir(args.dir, args.layers, args.vocab)
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.0f} s",
          flush=True)
    layer_gguf = sum(n for k, n in sizes.items() if k.startswith("blk.0."))
    child = subprocess.run([sys.executable, __file__, "--child", str(path), str(config), args.device],
                           capture_output=True, text=True, check=True)
    load = json.loads(child.stdout.strip().splitlines()[-1])
    file_bytes = path.stat().st_size
    bound = file_bytes + 2 * layer_gguf
    gib = 2**30
    print(f"load: {load['load_s']:.1f} s, peak RSS {load['peak_rss'] / gib:.2f} GiB; file "
          f"{file_bytes / gib:.2f} GiB + two layers {2 * layer_gguf / gib:.2f} GiB = {bound / gib:.2f} GiB "
          f"({'within' if load['peak_rss'] <= bound else 'OVER'}); of it, embeddings, norm and head "
          f"dense in the compute dtype: {load['fixed_dense_bytes'] / gib:.2f} GiB", flush=True)
    print(f"a layer crosses as {load['layer_bytes'] / 2**20:.1f} MiB; its GGUF tensors hold "
          f"{layer_gguf / 2**20:.1f} MiB ({'equal' if load['layer_bytes'] == layer_gguf else 'differ'}"
          f"; 16-bit: {sum(r * c for r, c in SHAPES.values()) * 2 / 2**20:.0f} MiB)", flush=True)
    timing = time_dequant(path, config, torch.device(args.device), args.repeats)
    print(f"dequant of a layer on {args.device}: {timing['dequant_s'] * 1000:.0f} ms "
          f"({timing['dequant_round_trips']} host round trips), copy of its bytes "
          f"{timing['copy_s'] * 1000:.0f} ms: dequant/copy = {timing['dequant_s'] / timing['copy_s']:.1f}",
          flush=True)
    if "diffusers_dequant_s" in timing:
        print(f"diffusers' dequant of the same layer: {timing['diffusers_dequant_s'] * 1000:.0f} ms "
              f"({timing['diffusers_round_trips']} host round trips)", flush=True)
    print("max abs error against gguf's numpy dequant: " + ", ".join(
        f"{k[:-12]} {v:.3g}" for k, v in timing.items() if k.endswith("_max_abs_err")), flush=True)
    result = dict(date=str(datetime.date.today()), machine=f"{platform.node()} "
                  f"{psutil.cpu_count()} cores {psutil.virtual_memory().total / gib:.0f} GiB",
                  device=args.device, layers=args.layers, vocab=args.vocab, file_bytes=file_bytes,
                  layer_gguf_bytes=layer_gguf, **load, **timing)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
