#!/usr/bin/env python3
"""PyTorch reference numerics for fabbrica's GPT (nanoGPT GPT-2, dropout 0), CPU fp32, or with
--autocast under torch.autocast("cpu", dtype=torch.bfloat16) (forward and loss; parameters,
gradients and AdamW stay fp32, as in fabbrica's train.dtype=bf16).

Writes one .safetensors file containing:
  <param name>          initial parameters (state-dict names; lm_head.weight omitted, tied to wte)
  x, y                  int64 [B, T] batch
  logits                [B, T, V] forward at the initial weights
  loss                  [] scalar cross-entropy at the initial weights
  grad.<param name>     gradients of `loss` at the initial weights
  grad_norm             [] total L2 norm of all gradients (before clipping)
  losses                [steps] training losses on the same batch (losses[0] == loss)
  final.<param name>    parameters after the last AdamW step

Usage:
  python scripts/torch_reference.py --out FILE.safetensors [--vocab 65 --block 16 --layers 2
      --heads 2 --embd 32 --bias 1 --batch 4 --seed 1337 --steps 10 --lr 1e-3 --wd 0.1
      --beta1 0.9 --beta2 0.95 --eps 1e-8 --clip 1.0 --autocast]
"""

import argparse
import json
import math
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------- model


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        assert n_embd % n_head == 0
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.n_head = n_head
        self.n_embd = n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd, bias):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()  # exact (approximate='none')
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, bias):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, bias)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5, bias=bias)
        self.mlp = MLP(n_embd, bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, vocab, block, n_layer, n_head, n_embd, bias):
        super().__init__()
        self.block_size = block
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab, n_embd),
                wpe=nn.Embedding(block, n_embd),
                h=nn.ModuleList([Block(n_embd, n_head, bias) for _ in range(n_layer)]),
                ln_f=nn.LayerNorm(n_embd, eps=1e-5, bias=bias),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (as nanoGPT)

        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            torch.nn.init.ones_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)

    def forward(self, idx, targets):
        B, T = idx.size()
        assert T <= self.block_size
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for blk in self.transformer.h:
            x = blk(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


# --------------------------------------------------------------------------- safetensors


def save_safetensors(tensors, path):
    """Minimal safetensors writer (F32 / I64, little-endian, contiguous)."""
    dtype_names = {torch.float32: "F32", torch.int64: "I64"}
    header = {}
    blobs = []
    offset = 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in dtype_names:
            raise ValueError(f"{name}: unsupported dtype {t.dtype}")
        data = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": dtype_names[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * ((8 - len(hbytes) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for b in blobs:
            f.write(b)


def write_file(tensors, path):
    try:
        from safetensors.torch import save_file  # type: ignore
    except ImportError:
        save_safetensors(tensors, path)
    else:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)


# --------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=65)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--embd", type=int, default=32)
    ap.add_argument("--bias", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast on the CPU for forward and loss")
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(args.seed)

    model = GPT(args.vocab, args.block, args.layers, args.heads, args.embd, bool(args.bias))
    assert model.lm_head.weight is model.transformer.wte.weight

    # Perturb LayerNorm params so that they are not trivially 1 / 0.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                if m.bias is not None:
                    m.bias.add_(0.1 * torch.randn_like(m.bias))

    x = torch.randint(0, args.vocab, (args.batch, args.block), dtype=torch.int64)
    y = torch.randint(0, args.vocab, (args.batch, args.block), dtype=torch.int64)

    # named_parameters() de-duplicates the tied weight; it appears as transformer.wte.weight.
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    params = [p for _, p in named]

    out = {}
    for n, p in named:
        out[n] = p.detach().clone()
    out["x"] = x.clone()
    out["y"] = y.clone()

    def run(x, y):
        if not args.autocast:
            return model(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, y)

    # Forward / backward at the initial weights.
    model.train()
    logits, loss = run(x, y)
    loss.backward()
    out["logits"] = logits.detach().float().clone()
    out["loss"] = loss.detach().float().clone().reshape([])
    for n, p in named:
        out["grad." + n] = p.grad.detach().clone()
    grads = [p.grad.detach() for p in params]
    if hasattr(torch.nn.utils, "get_total_norm"):
        # Exactly what clip_grad_norm_ computes before clipping.
        grad_norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=False)
    else:
        grad_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads]), 2.0
        )
    out["grad_norm"] = grad_norm.clone().reshape([])
    model.zero_grad(set_to_none=True)

    # Training on the same batch.
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.wd},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(args.beta1, args.beta2),
        eps=args.eps,
        foreach=False,
        fused=False,
    )
    losses = []
    for step in range(args.steps):
        opt.zero_grad(set_to_none=True)
        _, l = run(x, y)
        losses.append(l.item())
        l.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, args.clip)
        if step == 0:
            assert torch.allclose(gn, grad_norm, rtol=1e-6, atol=0), (gn, grad_norm)
        opt.step()
    opt.zero_grad(set_to_none=True)

    losses_t = torch.tensor(losses, dtype=torch.float32)
    if args.steps > 0:
        assert losses_t[0].item() == out["loss"].item(), (losses_t[0].item(), out["loss"].item())
    out["losses"] = losses_t
    for n, p in named:
        out["final." + n] = p.detach().clone()

    for k, v in out.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)

    write_file(out, args.out)
    last = losses[-1] if losses else float("nan")
    print(
        f"loss={out['loss'].item():.6f} grad_norm={grad_norm.item():.6f} "
        f"losses[-1]={last:.6f} tensors={len(out)} out={args.out}"
    )


if __name__ == "__main__":
    main()
