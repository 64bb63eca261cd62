"""PyTorch eager baseline on the CPU for `fabbrica bench train`: the model class of
../shared/anchors/torch_gpt_bench.py (same architecture as ours), fp32, AdamW, grad clip 1.0,
random tokens, same timing protocol (warm-up steps, then the mean of timed steps).
Prints one JSON line.

  .venv/bin/python scripts/torch_cpu_bench.py --layers 4 --heads 4 --embd 128 --vocab 128 --block 128 --batch 32
"""
import argparse, importlib.util, json, os, time
import torch

here = os.path.dirname(os.path.abspath(__file__))
anchor = os.path.join(here, "..", "..", "shared", "anchors", "torch_gpt_bench.py")
spec = importlib.util.spec_from_file_location("anchor", anchor)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)

ap = argparse.ArgumentParser()
for k, d in [("layers", 4), ("heads", 4), ("embd", 128), ("vocab", 128), ("block", 128), ("batch", 32), ("steps", 20), ("warmup", 3), ("threads", 0)]:
    ap.add_argument(f"--{k}", type=int, default=d)
a = ap.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
torch.manual_seed(1337)
model = mod.GPT(a.vocab, a.block, a.layers, a.heads, a.embd)
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.99), foreach=False)
x = torch.randint(0, a.vocab, (a.batch, a.block))
y = torch.randint(0, a.vocab, (a.batch, a.block))

def step():
    loss = model(x, y)  # the anchor's forward returns the mean cross-entropy
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

for _ in range(a.warmup):
    step()
t0 = time.perf_counter()
for _ in range(a.steps):
    loss = step()
secs = time.perf_counter() - t0
print(json.dumps(dict(impl="pytorch-eager-cpu", threads=torch.get_num_threads(), step_ms=1e3 * secs / a.steps,
                      tokens_per_s=a.batch * a.block * a.steps / secs, loss=round(loss.item(), 4))))
