#!/usr/bin/env python3
"""Pretrain a vlkernels reference model.

    python examples/pretrain.py --model vilt --steps 50
    python examples/pretrain.py --model uniter --size base --steps 1000 --data my_batches.pt

Runs AdamW with linear warmup and decay, bf16 autocast on a GPU (fp32 on CPU), and shows the
losses of every objective in a progress bar. Without ``--data`` it trains on a small synthetic
data set it generates (captions whose images show their words, vlkernels.models.synthetic), so
it runs on a fresh machine; the last line compares the mean loss of the first and last steps.

Real data (COCO / Visual Genome captions with images or detector features): save a list of
batches, each a dict with the same keys and shapes as ``model.synthetic_batch(n)`` returns
(the model's forward documents each), and pass it with ``--data``; see examples/README.md.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time

import torch

from vlkernels.models import MODELS, build_model
from vlkernels.models.synthetic import to_device


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--size", default="tiny", choices=("tiny", "base"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dataset-batches", type=int, default=4, help="synthetic batches to cycle through")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=float, default=0.1, help="warmup steps, as a fraction of --steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--no-kernels", action="store_true", help="run the torch references instead of the kernels")
    parser.add_argument("--data", help="a torch.save'd list of batch dicts (the keys of model.synthetic_batch)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def warmup_then_linear_decay(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


class DataError(ValueError):
    """A --data file that cannot be read or does not fit the model (reported in one line)."""


def load_data(path: str, model) -> list:
    """The batches of a --data file, checked against the model's own batch (its keys, and each
    tensor's dtype and number of dimensions) before any step runs."""
    if not os.path.isfile(path):
        raise DataError(f"--data {path}: no such file")
    try:
        data = torch.load(path, weights_only=True)
    except Exception as error:  # not a torch.save file, a truncated one, pickled objects weights_only refuses
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"--data {path}: cannot be read by torch.load(weights_only=True): {first}") from None
    if not isinstance(data, list) or not data or not all(isinstance(b, dict) for b in data):
        raise DataError(f"--data {path}: expected a non-empty list of batch dicts, got {type(data).__name__}")
    expected = model.synthetic_batch(2, generator=torch.Generator().manual_seed(0))
    for i, batch in enumerate(data):
        missing, extra = sorted(set(expected) - set(batch)), sorted(set(batch) - set(expected))
        if missing or extra:
            raise DataError(f"--data {path}: batch {i} does not fit this model: missing keys {missing or 'none'}, "
                            f"unexpected keys {extra or 'none'} (the keys of model.synthetic_batch)")
        for key, want in expected.items():
            got = batch[key]
            if isinstance(want, torch.Tensor) and (not isinstance(got, torch.Tensor) or got.dim() != want.dim()
                                                   or got.dtype.is_floating_point != want.dtype.is_floating_point):
                what = f"{got.dtype} with {got.dim()} dims" if isinstance(got, torch.Tensor) else type(got).__name__
                raise DataError(f"--data {path}: batch {i}[{key!r}] is {what}; this model takes {want.dtype} "
                                f"with {want.dim()} dims")
    return data


def batches(model, args, device):
    if args.data:
        data = load_data(args.data, model)
    else:
        data = [model.synthetic_batch(args.batch_size, generator=torch.Generator().manual_seed(args.seed + i))
                for i in range(args.dataset_batches)]
    return itertools.cycle([to_device(batch, device) for batch in data])


def progress(total: int):
    try:
        from tqdm import tqdm
        return tqdm(total=total, dynamic_ncols=True)
    except ImportError:  # tqdm comes with the [bench] extra; plain lines otherwise
        class Lines:
            def update(self, _):
                pass

            def set_postfix_str(self, text):
                print(text, flush=True)

            def close(self):
                pass
        return Lines()


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = build_model(args.model, args.size, use_kernels=not args.no_kernels).to(device).train()
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_then_linear_decay(max(1, math.ceil(args.warmup * args.steps)), args.steps))
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{args.model} ({args.size}, {parameters / 1e6:.2f} M parameters) on {device}, {precision}, "
          f"{'torch references' if args.no_kernels else 'vlkernels kernels'}", flush=True)

    try:
        data = batches(model, args, device)
    except DataError as error:
        print(f"pretrain.py: {error}", file=sys.stderr)
        return 2
    bar, losses = progress(args.steps), []
    start = time.perf_counter()
    for step in range(args.steps):
        batch = next(data)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = model(**batch)
        if not torch.isfinite(out.loss):
            print(f"\nstep {step}: the loss is {out.loss.item()}; stopping", file=sys.stderr)
            return 1
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out.loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(out.loss.item())
        bar.update(1)
        bar.set_postfix_str(" ".join(f"{k} {v.item():.3f}" for k, v in out.losses.items()) + f" | loss {losses[-1]:.3f}")
    bar.close()
    window = max(1, min(5, len(losses) // 4))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s: mean loss of the first {window} steps "
          f"{first:.4f}, of the last {window} {last:.4f} ({'falling' if last < first else 'NOT falling'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
