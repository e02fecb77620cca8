#!/usr/bin/env python3
"""Gradient-Mask Tuning with the Hugging Face Trainer and gmtk.torch.AdamW.

Fine-tunes a tiny Llama (built from a LlamaConfig: 2 decoder layers, hidden
64, vocab 256; random initial weights, nothing downloaded) on a synthetic
dataset made in this script (token sequences that follow arithmetic
progressions mod 256, so the loss has something to learn), with the optimizer
handed to the Trainer:

    optimizer = gmtk.torch.AdamW(groups, lr=..., mask_ratio=0.9, scope="per_tensor")
    Trainer(..., optimizers=(optimizer, None))   # Trainer builds its own LR scheduler

The usual two parameter groups are used (weight decay on matrices, none on
norms). A TrainerCallback prints, at every logging step, the loss, the
learning rate and the real mask ratio of the last optimizer step,
1 - optimizer.kept_fraction() (ties at the threshold are kept, so it can be a
little under --mask-ratio), next to the ratio the kept target implies,
floor(r * n) / n summed over the masked sets.

Runs on the GPU when there is one (gmtk's CUDA backend), else on the CPU
(gmtk's CPU reference backend; use_cpu=True). Offline: HF_HUB_OFFLINE=1 is set
before transformers is imported and nothing is downloaded. About 10-30 s for
the default 30 steps on a 2-core CPU.

Usage:
    python examples/hf_trainer_gmt.py                       # mask ratio 0.9, per tensor, 30 steps
    python examples/hf_trainer_gmt.py --mask-ratio 0.5 --scope global --steps 60 --logging-steps 10
    python examples/hf_trainer_gmt.py --mask-ratio 0    # plain AdamW through gmtk, for comparison

Prints one line per logging step:
    step   5  loss 5.5012  lr 8.33e-04  real mask ratio 0.8999 (target 0.8999)
and, at the end, the first and last logged loss, the optimizer's plan
builds, and the wall time. The Trainer's model.zero_grad() frees gradients;
when the next backward puts them in new storage (on the CPU, every step) gmtk
rebuilds the group's plan, which is correct but costs a little: --keep-grads
makes zero_grad zero them in place, and each plan is built once.
"""

import argparse
import functools
import os
import sys
import time

# Offline before anything from Hugging Face is imported: nothing is downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import gmtk  # noqa: E402
import gmtk.torch  # noqa: E402


class ProgressionDataset(Dataset):
    """Sequences t_i = (start + stride * i) mod vocab: learnable from context."""

    def __init__(self, size, seq_len, vocab, seed):
        gen = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (size, 1), generator=gen)
        stride = torch.randint(1, 8, (size, 1), generator=gen)
        self.tokens = (start + stride * torch.arange(seq_len).unsqueeze(0)) % vocab

    def __len__(self):
        return self.tokens.shape[0]

    def __getitem__(self, i):
        ids = self.tokens[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def param_groups(model, weight_decay):
    """The usual split: decay on matrices, none on biases and norm weights."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def target_mask_ratio(optimizer):
    """Masked share implied by the kept target k = n - floor(r * n) of each set."""
    masked = total = 0
    for group in optimizer.param_groups:
        r = float(group.get("mask_ratio", 0.0))
        # Every parameter of this model gets a gradient each step (at on_log time the
        # Trainer has already freed them, so .grad cannot tell).
        sizes = [p.numel() for p in group["params"]]
        sets = [sum(sizes)] if group.get("scope", "per_tensor") == "global" else sizes
        for n in sets:
            product = r * float(n)
            masked += n if product >= float(n) else int(product)
            total += n
    return masked / total if total else 0.0


class MaskRatioLogger(TrainerCallback):
    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs:
            return  # the final summary (train_runtime, ...)
        real = 1.0 - self.optimizer.kept_fraction().item()
        self.losses.append(logs["loss"])
        print("step %4d  loss %.4f  lr %.2e  real mask ratio %.4f (target %.4f)"
              % (state.global_step, logs["loss"], logs.get("learning_rate", float("nan")), real,
                 target_mask_ratio(self.optimizer)), flush=True)


def main():
    ap = argparse.ArgumentParser(description="HF Trainer + gmtk.torch.AdamW (GMT) on a tiny Llama, offline.")
    ap.add_argument("--mask-ratio", type=float, default=0.9)
    ap.add_argument("--scope", choices=["per_tensor", "global"], default="per_tensor")
    ap.add_argument("--mask-mode", choices=["grad", "freeze"], default="grad")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--logging-steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    ap.add_argument("--keep-grads", action="store_true",
                    help="make the Trainer's model.zero_grad() zero gradients in place (set_to_none=False), "
                         "so gmtk builds each group's plan once")
    ap.add_argument("--output-dir", default=None, help="Trainer output_dir (default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    transformers.set_seed(args.seed)
    use_cpu = args.cpu or not torch.cuda.is_available()
    device = torch.device("cpu" if use_cpu else "cuda")

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq_len,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(device)  # before the optimizer: its plans capture these buffers
    n_params = sum(p.numel() for p in model.parameters())

    optimizer = gmtk.torch.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999),
                                 eps=1e-8, mask_ratio=args.mask_ratio, scope=args.scope,
                                 mask_mode=args.mask_mode)

    dataset = ProgressionDataset(size=args.steps * args.batch_size, seq_len=args.seq_len,
                                 vocab=config.vocab_size, seed=args.seed)

    if args.output_dir is None:
        import tempfile

        args.output_dir = tempfile.mkdtemp(prefix="hf_trainer_gmt_")
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,  # only read by the scheduler Trainer builds; the optimizer has its own lr
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_strategy="steps",
        logging_steps=args.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
        seed=args.seed,
    )
    if args.keep_grads:
        # Trainer calls model.zero_grad(), which frees the gradients; gmtk then rebuilds a
        # group's plan whenever the next backward's gradients land in new storage (every
        # step on the CPU, rarely on CUDA with its caching allocator). Zeroing in place
        # keeps the storage, and the plans.
        model.zero_grad = functools.partial(model.zero_grad, set_to_none=False)
    logger = MaskRatioLogger(optimizer)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                      optimizers=(optimizer, None), callbacks=[logger])

    print("gmtk %s (%s backend), transformers %s, torch %s; tiny Llama %d params on %s"
          % (gmtk.__version__, "CPU reference" if use_cpu else "CUDA", transformers.__version__,
             torch.__version__, n_params, device))
    print("GMT: mask_ratio %g, scope %s, mask_mode %s, %d steps, batch %d x %d tokens\n"
          % (args.mask_ratio, args.scope, args.mask_mode, args.steps, args.batch_size, args.seq_len))
    trainer.train()

    if trainer.optimizer is not optimizer and getattr(trainer.optimizer, "optimizer", None) is not optimizer:
        print("WARNING: the Trainer did not use the gmtk optimizer", file=sys.stderr)
    if logger.losses:
        print("\nloss %.4f -> %.4f over %d steps; plan builds %s (%d groups); %.1f s"
              % (logger.losses[0], logger.losses[-1], args.steps, optimizer.plan_builds,
                 len(optimizer.param_groups), time.perf_counter() - t0))
        if optimizer.plan_builds > len(optimizer.param_groups) and not args.keep_grads:
            print("(plans were rebuilt because zero_grad() frees the gradients and the next backward put them "
                  "in new storage;\n --keep-grads zeroes them in place instead)")


if __name__ == "__main__":
    main()
