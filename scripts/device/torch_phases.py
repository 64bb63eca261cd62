"""Where a training step's time goes, PyTorch eager beside fabbrica, phase by phase.

Builds the model of ../shared/anchors/torch_gpt_bench.py (imported from --anchor, so both are the
same code) with its optimizer and step, and times each phase with the device synchronised after
it: forward with the loss (bf16 autocast), backward, clip_grad_norm_, AdamW (fused), zero_grad
(set_to_none). fabbrica's phases come from `fabbrica bench train --profile N --json F` (same
phases, same synchronisation). Prints both and the ratio per phase; --json writes them.

  python3 torch_phases.py --anchor torch_gpt_bench.py --fabbrica f.json --json out.json \
      --preset gpt2-124m --batch 16 [--profile-steps 10 --warmup 5 ...]
"""
import argparse, importlib.util, json, time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--anchor', required=True)
    ap.add_argument('--fabbrica', help="fabbrica bench train --profile N --json FILE")
    ap.add_argument('--json')
    ap.add_argument('--preset', default='gpt2-124m')
    ap.add_argument('--layers', type=int); ap.add_argument('--heads', type=int); ap.add_argument('--embd', type=int)
    ap.add_argument('--vocab', type=int, default=50304); ap.add_argument('--block', type=int, default=1024)
    ap.add_argument('--batch', type=int, default=16)
    ap.add_argument('--steps', type=int, help="the anchor's timed steps (not used: see --profile-steps)")
    ap.add_argument('--warmup', type=int, default=5)
    ap.add_argument('--profile-steps', type=int, default=10)
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location('anchor', a.anchor)
    anchor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(anchor)
    L, H, D = anchor.PRESETS[a.preset]
    L, H, D = a.layers or L, a.heads or H, a.embd or D
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = anchor.GPT(a.vocab, a.block, L, H, D).to(dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.1}, {'params': no_decay, 'weight_decay': 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), fused=True)
    x = torch.randint(0, a.vocab, (a.batch, a.block), device=dev)
    y = torch.randint(0, a.vocab, (a.batch, a.block), device=dev)
    sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)
    names = ['forward', 'backward', 'clip', 'optimizer', 'zero_grad']
    ms = dict.fromkeys(names, 0.0)

    def step(timed):
        t = time.perf_counter()

        def lap(name):
            nonlocal t
            sync()
            if timed:
                ms[name] += (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == 'cuda'):
            loss = model(x, y)
        lap('forward')
        loss.backward()
        lap('backward')
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lap('clip')
        opt.step()
        lap('optimizer')
        opt.zero_grad(set_to_none=True)
        lap('zero_grad')

    for _ in range(a.warmup):
        step(False)
    sync()
    for _ in range(a.profile_steps):
        step(True)
    torch_ms = {k: v / a.profile_steps for k, v in ms.items()}
    fab = None
    if a.fabbrica:
        p = json.load(open(a.fabbrica)).get('profile')
        if not p:
            raise SystemExit(f"error: {a.fabbrica} has no profile: run fabbrica bench train with --profile N")
        fab = {k: p[k + '_ms'] for k in names}
    print(f"{'phase (ms)':12} {'fabbrica':>10} {'pytorch':>10} {'ratio':>7}")
    for k in names + ['total']:
        t = sum(torch_ms.values()) if k == 'total' else torch_ms[k]
        f = (sum(fab.values()) if k == 'total' else fab[k]) if fab else float('nan')
        print(f"{k:12} {f:10.2f} {t:10.2f} {f / t if t else float('nan'):7.2f}")
    if a.json:
        json.dump({'device': torch.cuda.get_device_name() if dev == 'cuda' else 'cpu', 'torch': torch.__version__,
                   'steps': a.profile_steps, 'pytorch_ms': torch_ms, 'fabbrica_ms': fab}, open(a.json, 'w'), indent=1)


if __name__ == '__main__':
    main()
