"""Fine-tune a small image classifier with mixed precision, gradient accumulation and early stopping."""

import argparse
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup_steps: int = 500
    grad_accum: int = 2
    clip_norm: float = 1.0
    patience: int = 5
    label_smoothing: float = 0.1
    out_dir: str = "checkpoints"


def cosine_lr(step: int, total: int, warmup: int, base_lr: float, min_lr: float = 1e-6) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def accuracy(logits: torch.Tensor, targets: torch.Tensor, topk=(1, 5)) -> list[float]:
    maxk = max(topk)
    _, pred = logits.topk(maxk, dim=1)
    correct = pred.eq(targets.view(-1, 1).expand_as(pred))
    return [correct[:, :k].any(dim=1).float().mean().item() for k in topk]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> dict:
    model.eval()
    total_loss, total_top1, total_top5, n = 0.0, 0.0, 0.0, 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        top1, top5 = accuracy(logits, labels)
        batch = labels.size(0)
        total_loss += loss.item() * batch
        total_top1 += top1 * batch
        total_top5 += top5 * batch
        n += batch
    model.train()
    return {"loss": total_loss / n, "top1": total_top1 / n, "top5": total_top5 / n}


def train(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, cfg: TrainConfig) -> nn.Module:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.999),
    )
    total_steps = cfg.epochs * len(train_loader) // cfg.grad_accum
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    best_top1, bad_epochs, step = 0.0, 0, 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    for epoch in range(cfg.epochs):
        start = time.time()
        running = 0.0
        optimizer.zero_grad(set_to_none=True)
        for i, (images, labels) in enumerate(train_loader):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                logits = model(images)
                loss = criterion(logits.float(), labels) / cfg.grad_accum
            loss.backward()
            running += loss.item()
            if (i + 1) % cfg.grad_accum == 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(step, total_steps, cfg.warmup_steps, cfg.lr)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % 100 == 0:
                    print(f"epoch {epoch} step {step} loss {running / 100:.4f} lr {optimizer.param_groups[0]['lr']:.2e}")
                    running = 0.0
        metrics = evaluate(model, val_loader, device)
        print(f"epoch {epoch}: val loss {metrics['loss']:.4f} top1 {metrics['top1']:.4f} "
              f"top5 {metrics['top5']:.4f} ({time.time() - start:.1f}s)")
        if metrics["top1"] > best_top1:
            best_top1, bad_epochs = metrics["top1"], 0
            torch.save({"model": model.state_dict(), "epoch": epoch, "top1": best_top1},
                       os.path.join(cfg.out_dir, "best.pt"))
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                print(f"early stopping after {epoch + 1} epochs, best top1 {best_top1:.4f}")
                break
    state = torch.load(os.path.join(cfg.out_dir, "best.pt"), map_location=device)
    model.load_state_dict(state["model"])
    return model


def parse_args() -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--out-dir", default="checkpoints")
    args = parser.parse_args()
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, grad_accum=args.grad_accum,
                       out_dir=args.out_dir)
