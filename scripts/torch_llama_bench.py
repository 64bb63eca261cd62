"""Baseline for `fabbrica bench train` on Llama shapes: transformers' LlamaForCausalLM (eager
PyTorch, SDPA attention, no compile), made offline by from_config, fp32, AdamW, grad clip 1.0,
random tokens, the protocol of scripts/torch_cpu_bench.py (warm-up steps, then the mean of timed
steps). Prints one JSON line.

  .venv/bin/python scripts/torch_llama_bench.py --layers 4 --heads 4 --kv-heads 2 --embd 128 --ffn 352 --vocab 128 --block 128 --batch 32
"""
import argparse, json, time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ap = argparse.ArgumentParser()
for k, d in [("layers", 4), ("heads", 4), ("kv-heads", 2), ("embd", 128), ("ffn", 352), ("vocab", 128), ("block", 128),
             ("batch", 32), ("steps", 20), ("warmup", 3), ("threads", 0)]:
    ap.add_argument(f"--{k}", type=int, default=d)
ap.add_argument("--tied", action="store_true")
ap.add_argument("--fused-adamw", action="store_true", help="torch.optim.AdamW(fused=True) instead of the single-tensor default")
a = ap.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
torch.manual_seed(1337)
cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.embd, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                  num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=a.block,
                  rms_norm_eps=1e-5, tie_word_embeddings=a.tied, bos_token_id=0, eos_token_id=0, use_cache=False)
model = LlamaForCausalLM(cfg)
model.config._attn_implementation = "sdpa"
model.train()
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-4, betas=(0.9, 0.95),
                        **({"fused": True} if a.fused_adamw else {"foreach": False}))
x = torch.randint(0, a.vocab, (a.batch, a.block))
y = torch.randint(0, a.vocab, (a.batch, a.block))


def step():
    logits = model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
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
print(json.dumps(dict(impl="transformers-llama-eager-cpu" + ("-fused-adamw" if a.fused_adamw else ""), threads=torch.get_num_threads(), params=sum(p.numel() for p in model.parameters()),
                      step_ms=1e3 * secs / a.steps, tokens_per_s=a.batch * a.block * a.steps / secs, loss=round(loss.item(), 4))))
