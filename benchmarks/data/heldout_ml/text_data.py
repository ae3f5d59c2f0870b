"""Data pipeline for language-model training: tokenized shards, packed sequences, a collate function."""

import glob
import json
import os
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset


class TokenShards(IterableDataset):
    """Streams fixed-length training sequences from memory-mapped uint16 token shards."""

    def __init__(self, pattern: str, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.files = sorted(glob.glob(pattern))
        if not self.files:
            raise FileNotFoundError(f"no shards match {pattern}")
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        num_workers = worker.num_workers if worker is not None else 1
        rng = random.Random(self.seed + 1000 * self.rank + worker_id)
        files = self.files[self.rank * num_workers + worker_id :: self.world_size * num_workers]
        while True:
            rng.shuffle(files)
            for path in files:
                tokens = np.memmap(path, dtype=np.uint16, mode="r")
                n = (len(tokens) - 1) // self.seq_len
                order = list(range(n))
                rng.shuffle(order)
                for i in order:
                    chunk = torch.from_numpy(tokens[i * self.seq_len : (i + 1) * self.seq_len + 1].astype(np.int64))
                    yield chunk[:-1], chunk[1:]


class JsonlInstructions(Dataset):
    """Instruction-tuning examples: the loss is taken on the response tokens only."""

    def __init__(self, path: str, tokenizer, max_len: int = 1024):
        with open(path, encoding="utf-8") as f:
            self.rows = [json.loads(line) for line in f if line.strip()]
        self.tokenizer = tokenizer
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: int) -> dict:
        row = self.rows[idx]
        prompt = f"### Instruction:\n{row['instruction']}\n\n### Response:\n"
        prompt_ids = self.tokenizer.encode(prompt)
        response_ids = self.tokenizer.encode(row["response"]) + [self.tokenizer.eos_token_id]
        input_ids = (prompt_ids + response_ids)[: self.max_len]
        labels = ([-100] * len(prompt_ids) + response_ids)[: self.max_len]
        return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}


def pad_collate(batch: list[dict], pad_id: int) -> dict:
    longest = max(item["input_ids"].size(0) for item in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, item in enumerate(batch):
        n = item["input_ids"].size(0)
        input_ids[i, :n] = item["input_ids"]
        labels[i, :n] = item["labels"]
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def make_loaders(data_dir: str, tokenizer, batch_size: int = 8, seq_len: int = 1024, num_workers: int = 4):
    train = TokenShards(os.path.join(data_dir, "train_*.bin"), seq_len)
    val = JsonlInstructions(os.path.join(data_dir, "val.jsonl"), tokenizer, max_len=seq_len)
    train_loader = DataLoader(train, batch_size=batch_size, num_workers=num_workers, pin_memory=True)
    val_loader = DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=lambda b: pad_collate(b, tokenizer.pad_token_id))
    return train_loader, val_loader


def write_shards(texts: list[str], tokenizer, out_dir: str, shard_tokens: int = 10_000_000) -> int:
    os.makedirs(out_dir, exist_ok=True)
    buffer: list[int] = []
    shard = 0
    for text in texts:
        buffer.extend(tokenizer.encode(text) + [tokenizer.eos_token_id])
        while len(buffer) >= shard_tokens:
            np.array(buffer[:shard_tokens], dtype=np.uint16).tofile(os.path.join(out_dir, f"train_{shard:05d}.bin"))
            buffer = buffer[shard_tokens:]
            shard += 1
    if buffer:
        np.array(buffer, dtype=np.uint16).tofile(os.path.join(out_dir, f"train_{shard:05d}.bin"))
        shard += 1
    return shard


@torch.no_grad()
def perplexity(model, loader: DataLoader, device: str = "cuda", max_batches: int = 200) -> float:
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total_loss += loss.item()
        total_tokens += (labels != -100).sum().item()
    model.train()
    return float(np.exp(total_loss / max(1, total_tokens)))
