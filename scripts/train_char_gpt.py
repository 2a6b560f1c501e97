"""A small character-level GPT on Tiny Shakespeare, for labs 06 (decoding strategies) and 09.

Lab 07 builds the same architecture from scratch under GPT-2's parameter names; this
script keeps its own names and checkpoint format, which labs 06 and 09 load.

This file is the one definition of the model: the training below imports nothing
else from the course, and the lab notebook loads this file with importlib to
rebuild the model from the shipped checkpoint. Retrain with the defaults (3 to 15
minutes on one CPU core, no GPU needed) and the result lands in data/char_gpt/:

    python scripts/train_char_gpt.py

data/char_gpt/model.pt     the state dict (loads with torch.load(weights_only=True))
data/char_gpt/config.json  the model's shape, its character vocabulary, the training
                           settings and the final losses

The model is a standard decoder-only transformer (Pre-LN blocks, learned positions,
causal self-attention, GELU MLP, weight tying), i.e. GPT-2 in miniature. Calling it on
token ids `(B, L)` returns next-token logits `(B, L, vocab_size)`: a plain callable
returning logits, which is what the decoders of lab 06 accept.
"""

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_DIR = Path(__file__).resolve().parents[1]


@dataclass
class CharGPTConfig:
    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 3
    n_head: int = 4
    n_embd: int = 96
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: CharGPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)
        # (B, L, C) -> (B, heads, L, C / heads)
        q, k, v = (t.view(B, L, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, L, C))


class Block(nn.Module):
    def __init__(self, cfg: CharGPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """`model(idx)` with idx `(B, L)` -> logits `(B, L', vocab_size)`, L' = min(L, block_size).

    A context longer than `block_size` is cropped to its last `block_size` tokens, so a
    decoder can keep calling the model on an ever longer sequence and read `[:, -1]`.
    """

    def __init__(self, cfg: CharGPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying, as in GPT-2
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                # GPT-2's scaled init of the projections that write into the residual stream
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx):
        idx = idx[:, -self.cfg.block_size :]
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class CharTokenizer:
    """Characters <-> ids; the vocabulary is the sorted set of characters of the corpus."""

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    def encode(self, text: str) -> list[int]:
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def load_char_gpt(ckpt_dir, map_location="cpu"):
    """Rebuild the trained model (in eval mode) and its tokenizer from `ckpt_dir`."""
    ckpt_dir = Path(ckpt_dir)
    meta = json.loads((ckpt_dir / "config.json").read_text(encoding="utf-8"))
    model = CharGPT(CharGPTConfig(**meta["model"]))
    state = torch.load(ckpt_dir / "model.pt", map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.eval(), CharTokenizer(meta["chars"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO_DIR / "data" / "tinyshakespeare.txt")
    p.add_argument("--out", type=Path, default=REPO_DIR / "data" / "char_gpt")
    p.add_argument("--n-layer", type=int, default=3)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=96)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-iters", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr", type=float, default=3e-4)
    p.add_argument("--warmup-iters", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--log-interval", type=int, default=100)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads; one is fastest on a busy machine, the result barely depends on it")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    text = args.data.read_text(encoding="utf-8")
    chars = "".join(sorted(set(text)))
    tok = CharTokenizer(chars)
    data = torch.tensor(tok.encode(text), dtype=torch.long)
    n_val = int(len(data) * args.val_fraction)
    train_data, val_data = data[:-n_val], data[-n_val:]

    cfg = CharGPTConfig(
        vocab_size=len(chars), block_size=args.block_size, n_layer=args.n_layer,
        n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout,
    )
    model = CharGPT(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, vocabulary of {len(chars)} characters")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.99),
    )

    def lr_at(it):  # linear warm-up, then cosine decay that reaches min_lr at the last step
        if it < args.warmup_iters:
            return args.lr * (it + 1) / args.warmup_iters
        if it >= args.max_iters - 1:
            return args.min_lr
        # + 1: the last step the loop takes (max_iters - 1) lands exactly on min_lr
        t = (it - args.warmup_iters + 1) / (args.max_iters - args.warmup_iters)
        return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t))

    gen = torch.Generator().manual_seed(args.seed)

    def batch(split):
        d = train_data if split == "train" else val_data
        # starts 0 .. len(d) - block_size - 1: randint's bound is exclusive, so the last
        # window (whose target ends on the last character) can come up too
        ix = torch.randint(len(d) - args.block_size, (args.batch_size,), generator=gen)
        x = torch.stack([d[i : i + args.block_size] for i in ix])
        y = torch.stack([d[i + 1 : i + 1 + args.block_size] for i in ix])
        return x, y

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = {}
        for split in ("train", "val"):
            losses = [
                F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
                for x, y in (batch(split) for _ in range(args.eval_iters))
            ]
            out[split] = sum(losses) / len(losses)
        model.train()
        return out

    start = time.time()
    model.train()
    for it in range(args.max_iters):
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        x, y = batch("train")
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if it % args.log_interval == 0 or it == args.max_iters - 1:
            print(f"iter {it:5d}  loss {loss.item():.3f}  lr {lr_at(it):.2e}  {time.time() - start:6.1f}s", flush=True)

    losses = estimate_loss()
    elapsed = time.time() - start
    print(f"final: train {losses['train']:.3f}  val {losses['val']:.3f}  ({elapsed:.0f}s)")

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    torch.save(model.state_dict(), args.out / "model.pt")
    settings = {k: (str(v.relative_to(REPO_DIR)) if isinstance(v, Path) and v.is_relative_to(REPO_DIR) else
                    str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    meta = {
        "model": asdict(cfg),
        "chars": chars,
        "training": settings,
        "final_loss": {k: round(v, 4) for k, v in losses.items()},
        "train_seconds": round(elapsed),
        "torch_version": torch.__version__,
    }
    (args.out / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"saved {args.out / 'model.pt'} and {args.out / 'config.json'}")


if __name__ == "__main__":
    main()
