"""`specexec distill`: train a small draft for a target by knowledge distillation on the target's
own generations (DistillSpec: on-policy data, the divergence chosen for the decoding mode).

1. Data: the target answers each training prompt (greedy for `mode="greedy"`, sampled at the
   temperature for `mode="sampling"`); at every answer position its top-k logits and normalizers
   are kept, so training never runs the target again.
2. Training: the draft (a few decoder layers of the target's shape, sharing its embedding and
   head; `drafts.distilled`) minimizes forward KL to the target (greedy: the draft must rank the
   target's argmax first) or the total variation distance at the temperature (sampling: the
   acceptance rate of a drafted token is 1 - TVD). The target's tail beyond its top-k is one
   pooled bucket, on both sides.
3. Report: agreement on held-out prompts (the first Spec-Bench prompts of each category, which
   the benchmarks use): how often the draft's argmax is the target's, how often the target's
   argmax is in the draft's top 8 (what a tree needs), and 1 - TVD at the temperature, before
   and after training.

Everything resumes: the data and a checkpoint live in OUT/.distill and a rerun goes on from them.
The module yields events; the CLI prints.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from drafts.distilled import check_layers, embedding_probe, make_draft, own_state, save_draft

from specexec_app.core.settings import MAX_TEMPERATURE, SEED_LIMIT, check_range
from specexec_app.core.text import encode_chat
from specexec_app.errors import UserError
from specexec_app.files import remove_orphans, temp_folder
from specexec_app.core.lm import model_device
from specexec_app.tools.prompts import bench_prompts

WORK = ".distill"


@dataclass
class DistillSettings:
    layers: int = 2              # decoder layers of the draft
    steps: int = 400             # optimizer steps in all (a rerun with more steps goes on)
    batch: int = 8               # answers per step
    lr: float = 5e-4
    mode: str = "greedy"         # greedy: forward KL; sampling: TVD at `temperature`
    temperature: float = 0.6     # sampling mode: of the data and of the loss
    max_new_tokens: int = 96     # length of each target answer
    max_prompt_tokens: int = 320  # longer prompts are skipped
    prompts: int | None = None   # training prompts used (None: all)
    heldout: int = 3             # Spec-Bench prompts per category held out for the report
    top_k: int = 32              # target logits kept per answer position
    gen_batch: int = 16
    save_every: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("greedy", "sampling"):
            raise UserError(f"--mode must be greedy or sampling (got {self.mode})")
        for name in ("layers", "steps", "batch", "max_new_tokens", "top_k", "gen_batch",
                     "save_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        check_range(self.temperature, "--temperature", 0, MAX_TEMPERATURE, float, open_low=True)
        check_range(self.lr, "--lr", 0, 1, float, open_low=True)
        if self.prompts is not None:
            check_range(self.prompts, "--max-prompts", 1, 1 << 40)
        check_range(self.heldout, "--heldout", 1, 1 << 20)  # the report needs held-out prompts
        check_range(self.seed, "--seed", 0, SEED_LIMIT - 1)

    def data_key(self) -> dict:
        """What the generated data depends on: a rerun with other values starts afresh."""
        keys = ("mode", "max_new_tokens", "max_prompt_tokens", "prompts", "heldout", "top_k", "seed")
        return {k: getattr(self, k) for k in keys} | (
            {"temperature": self.temperature} if self.mode == "sampling" else {})


@dataclass
class Step:
    stage: str        # generating, evaluating, training
    done: int
    total: int
    loss: float | None = None


@dataclass
class Note:
    message: str


@dataclass
class Finished:
    out: Path
    report: dict


def prompt_sets(prompts_file: Path | None, heldout: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts). Spec-Bench: the first `heldout` of each category are
    held out. A file (one prompt per line, or JSON lines with "prompt" or "turns"): its last
    tenth is held out."""
    if prompts_file is None:
        held = [p for _, p in bench_prompts(first=0, count=heldout)]
        train = [p for _, p in bench_prompts(first=heldout, count=10**9)]
        return train, held
    try:
        lines = [line for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read {prompts_file}: {e.strerror}") from e
    prompts = []
    for line in lines:
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
                prompts.append(row["prompt"] if "prompt" in row else row["turns"][0])
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise UserError(f"{prompts_file}: a JSON line without 'prompt' or 'turns' ({e})") from e
        else:
            prompts.append(line)
    if len(prompts) < 4:
        raise UserError(f"{prompts_file} holds {len(prompts)} prompts; give at least 4")
    cut = max(1, len(prompts) // 10)
    return prompts[:-cut], prompts[-cut:]


def answer(target, prompts: list[list[int]], max_new: int, pad_id: int, stops: set[int],
           temperature: float | None, top_k: int | None):
    """The target's answers to a batch of prompts (greedy when `temperature` is None), and for
    each its top-k logits, logsumexp and logsumexp at the temperature per answer position."""
    dev = model_device(target)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    sample = temperature is not None
    with torch.inference_mode():
        out = target.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                              max_new_tokens=max_new, do_sample=sample,
                              temperature=temperature if sample else None, top_p=None, top_k=None,
                              pad_token_id=pad_id, eos_token_id=sorted(stops) or None,
                              output_logits=top_k is not None, return_dict_in_generate=True)
    seqs = out.sequences[:, width:].cpu()
    logits = torch.stack(out.logits, 1).float().cpu() if top_k is not None else None
    records = []
    for i, p in enumerate(prompts):
        toks = seqs[i].tolist()
        n = next((j + 1 for j, t in enumerate(toks) if t in stops), len(toks))
        rec = {"ids": torch.tensor(p + toks[:n], dtype=torch.int32), "start": len(p)}
        if logits is not None:
            row = logits[i, :n]
            values, top = row.topk(top_k, dim=-1)
            rec |= {"top_ids": top.to(torch.int32), "top_logits": values,
                    "lse": row.logsumexp(-1),
                    "lse_t": (row / (temperature or 1.0)).logsumexp(-1)}
        records.append(rec)
    return records


def _save(obj, path: Path) -> None:
    """Write nested dicts, lists, numbers, strings and tensors as one safetensors file: the
    tensors as tensors, the rest as JSON in its metadata (never a pickle: a planted file in a
    shared --out folder must not run code). Written to a temporary name, then renamed."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def pack(x):
        if isinstance(x, torch.Tensor):
            tensors[name := f"t{len(tensors)}"] = x.detach().cpu().contiguous()
            return {"__tensor__": name}
        if isinstance(x, dict):
            return {"__items__": [[pack(k), pack(v)] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            return [pack(v) for v in x]
        return x

    skeleton = json.dumps(pack(obj))
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"specexec": skeleton})
    os.replace(tmp, path)


def _load(path: Path):
    """What `_save` wrote; a file that cannot be read is a one-line error."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            skeleton = json.loads(f.metadata()["specexec"])
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, or not ours
        raise UserError(f"{path} cannot be read ({str(e).splitlines()[0][:200]}); rerun with "
                        "--fresh to start over") from e

    def unpack(x):
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            return {unpack(k): unpack(v) for k, v in x["__items__"]}
        if isinstance(x, list):
            return [unpack(v) for v in x]
        return x

    return unpack(skeleton)


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def make_data(target, tokenizer, stops: set[int], train: list[str], held: list[str],
              s: DistillSettings, path: Path) -> Iterator:
    """Generate (or resume generating) the training answers and the held-out greedy answers."""
    data = _load(path) if path.is_file() else None
    if data is not None and data["key"] != s.data_key():
        data = None
    if data is None:
        def encode(prompt: str) -> list[int]:  # a target without a chat template: the plain prompt
            if getattr(tokenizer, "chat_template", None):
                return encode_chat(tokenizer, [{"role": "user", "content": prompt}])
            return tokenizer(prompt).input_ids

        rng = random.Random(s.seed)
        enc = [e for e in map(encode, train) if len(e) <= s.max_prompt_tokens]
        rng.shuffle(enc)
        enc = enc[: s.prompts] if s.prompts else enc
        held_enc = [e for e in map(encode, held) if len(e) <= s.max_prompt_tokens]
        if not enc or not held_enc:
            raise UserError(f"no prompt fits --max-prompt-tokens {s.max_prompt_tokens}")
        # Prompts of like length share a batch (less padding); the order is shuffled in training.
        data = {"key": s.data_key(), "prompts": sorted(enc, key=len), "held_prompts": held_enc,
                "train": [], "held": []}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops, default=0)
    temperature = s.temperature if s.mode == "sampling" else None
    total = len(data["prompts"])
    torch.manual_seed(s.seed)
    while len(data["train"]) < total:
        done = len(data["train"])
        chunk = data["prompts"][done:done + s.gen_batch]
        data["train"] += answer(target, chunk, s.max_new_tokens, pad, stops, temperature, s.top_k)
        _save(data, path)
        yield Step("generating", len(data["train"]), total)
    if not data["held"]:
        for chunk in _batches(data["held_prompts"], s.gen_batch):
            data["held"] += [{"ids": r["ids"], "start": r["start"]} for r in
                             answer(target, chunk, min(64, s.max_new_tokens), pad, stops, None, None)]
        _save(data, path)
    return data


def _answer_hidden(model, records: list[dict]) -> torch.Tensor:
    """Final hidden states at the positions that predict each record's answer tokens [N, H]."""
    dev = model_device(model)
    width = max(len(r["ids"]) for r in records)
    ids = torch.zeros((len(records), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(records):  # right padding
        ids[i, : len(r["ids"])] = r["ids"].long()
        mask[i, : len(r["ids"])] = 1
    hidden = model.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
    rows = [hidden[i, r["start"] - 1: len(r["ids"]) - 1] for i, r in enumerate(records)]
    return torch.cat(rows)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def loss_fn(student_logits: torch.Tensor, records: list[dict], mode: str,
            temperature: float) -> torch.Tensor:
    """Forward KL (greedy) or TVD at the temperature (sampling) between the target's top-k plus
    one pooled tail bucket and the draft's mass on the same k tokens plus the rest."""
    dev = student_logits.device
    top = torch.cat([r["top_ids"] for r in records]).long().to(dev)
    t_logits = torch.cat([r["top_logits"] for r in records]).to(dev)
    t = 1.0 if mode == "greedy" else temperature
    lse = torch.cat([r["lse" if mode == "greedy" else "lse_t"] for r in records]).to(dev)
    p_top = t_logits / t - lse[:, None]                       # target log-probs of its top-k
    p_rest = _log1mexp(p_top.logsumexp(-1))
    q = torch.log_softmax(student_logits.float() / t, dim=-1)
    q_top = q.gather(-1, top)
    q_rest = _log1mexp(q_top.logsumexp(-1))
    p_all = torch.cat([p_top, p_rest[:, None]], -1)
    q_all = torch.cat([q_top, q_rest[:, None]], -1)
    if mode == "greedy":
        return (p_all.exp() * (p_all - q_all)).sum(-1).mean()
    return 0.5 * (p_all.exp() - q_all.exp()).abs().sum(-1).mean()


def _teacher_view(target, held: list[dict], temperature: float) -> list[dict]:
    """The target's argmax and tempered probabilities at each held-out answer position."""
    out = []
    with torch.inference_mode():
        for chunk in _batches(held, 8):
            logits = target.lm_head(_answer_hidden(target, chunk)).float()
            out.append({"argmax": logits.argmax(-1).cpu(),
                        "probs": torch.softmax(logits / temperature, -1).to(torch.bfloat16).cpu()})
    return out


def evaluate(draft, held: list[dict], teacher: list[dict], temperature: float) -> dict:
    """Agreement of the draft with the target on held-out greedy answers."""
    n = top1 = top8 = 0
    accept = 0.0
    with torch.inference_mode():
        for k, chunk in enumerate(_batches(held, 8)):
            logits = draft.lm_head(_answer_hidden(draft, chunk)).float().cpu()
            want = teacher[k]["argmax"]
            top1 += int((logits.argmax(-1) == want).sum())
            top8 += int((logits.topk(8, -1).indices == want[:, None]).any(-1).sum())
            q = torch.softmax(logits / temperature, -1)
            p = teacher[k]["probs"].float()
            accept += float((1 - 0.5 * (p - q).abs().sum(-1)).sum())
            n += len(want)
    return {"top1_agreement": top1 / n, "top8_coverage": top8 / n,
            f"acceptance_t{temperature:g}": accept / n, "positions": n}


def distill(target, tokenizer, stops: set[int], target_name: str, out: Path,
            s: DistillSettings, prompts_file: Path | None = None,
            fresh: bool = False) -> Iterator:
    """Distill a draft for `target` into `out`; yields Step, Note, then Finished."""
    check_layers(target, s.layers)  # before any data is made
    out = Path(out)
    work = out / WORK
    try:
        if fresh and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        remove_orphans(out, ".draft-")
    except OSError as e:
        raise UserError(f"cannot use {out} as the output folder: {e.strerror}") from e
    random.seed(s.seed)
    torch.manual_seed(s.seed)
    train, held = prompt_sets(prompts_file, s.heldout)
    started = time.perf_counter()

    data = yield from make_data(target, tokenizer, stops, train, held, s, work / "data.safetensors")
    records = [r for r in data["train"] if len(r["ids"]) > r["start"]]
    answer_tokens = sum(len(r["ids"]) - r["start"] for r in records)
    yield Note(f"{len(records)} target answers, {answer_tokens} answer tokens; "
               f"{len(data['held'])} held-out prompts")

    dev = model_device(target)
    draft, started_from = make_draft(target, s.layers, dev)
    params = list(own_state(draft).values())
    optim = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:  # warm-up, then cosine to a tenth
        if step < 10:
            return (step + 1) / 10
        frac = min(1.0, (step - 10) / max(1, s.steps - 10))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    eval_t = s.temperature
    teacher = _teacher_view(target, data["held"], eval_t)
    ckpt_path = work / "checkpoint.safetensors"
    key = {"data": s.data_key(), "layers": s.layers, "probe": embedding_probe(target)}
    step, before, losses = 0, None, []
    if ckpt_path.is_file():
        ckpt = _load(ckpt_path)
        if ckpt["key"] == key:
            draft.load_state_dict(ckpt["state"], strict=False)
            optim.load_state_dict(ckpt["optim"])
            step, before, losses = ckpt["step"], ckpt["before"], ckpt["losses"]
            yield Note(f"resuming from step {step} ({ckpt_path})")
    if before is None:
        yield Step("evaluating", 0, 1)
        before = evaluate(draft, data["held"], teacher, eval_t)
        yield Step("evaluating", 1, 1)

    def checkpoint() -> None:
        _save({"key": key, "step": step, "before": before, "losses": losses,
               "state": {k: v.detach().cpu() for k, v in own_state(draft).items()},
               "optim": optim.state_dict()}, ckpt_path)

    draft.train()
    order: list[int] = []
    rng = random.Random(s.seed + step)
    while step < s.steps:
        if len(order) < s.batch:
            more = list(range(len(records)))
            rng.shuffle(more)
            order += more
        batch = [records[i] for i in order[: s.batch]]
        del order[: s.batch]
        for group in optim.param_groups:
            group["lr"] = s.lr * lr_at(step)
        hidden = _answer_hidden(draft, batch)
        loss = loss_fn(draft.lm_head(hidden), batch, s.mode, s.temperature)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        step += 1
        losses.append(float(loss.detach()))
        if step % s.save_every == 0 or step == s.steps:
            checkpoint()
        yield Step("training", step, s.steps, sum(losses[-20:]) / len(losses[-20:]))
    draft.eval()
    yield Step("evaluating", 0, 1)
    after = evaluate(draft, data["held"], teacher, eval_t)
    yield Step("evaluating", 1, 1)
    report = {"target": target_name, "layers": s.layers, "initialized_from_target_layers": started_from,
              "mode": s.mode, "loss": "forward KL" if s.mode == "greedy" else f"TVD at T={s.temperature:g}",
              "steps": step, "train_answers": len(records), "train_answer_tokens": answer_tokens,
              "heldout_prompts": len(data["held"]), "first_loss": losses[0] if losses else None,
              "last_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
              "before": before, "after": after, "seconds_this_run": time.perf_counter() - started,
              "settings": asdict(s)}
    # Written whole beside OUT, then moved in file by file: a full disk or a kill leaves the
    # previous draft (or none), never a cut one.
    tmp = temp_folder(out, ".draft-")
    try:
        save_draft(draft, tmp, target, target_name, tokenizer, extra={"report": report})
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    except OSError as e:
        raise UserError(f"cannot write the draft to {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    yield Finished(out, report)
