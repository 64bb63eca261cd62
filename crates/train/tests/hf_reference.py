"""Reference side of the Hugging Face interop tests (crates/train/tests/hf_interop.rs).

make:    a tiny random GPT2LMHeadModel or LlamaForCausalLM made offline with `from_config`
         (no download), saved with save_pretrained to OUT/model, plus OUT/ref.safetensors with the
         inputs, targets, logits, loss and every parameter's gradient under its Hugging Face name.
compare: loads an exported directory with AutoModelForCausalLM.from_pretrained and checks that
         its tensors equal (bit for bit) another directory's, or writes its logits for given ids.
"""

import argparse
import json
import sys

import torch
from safetensors.torch import load_file, save_file


def make(args):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    if args.arch == "gpt2":
        cfg = GPT2Config(vocab_size=args.vocab, n_positions=32, n_embd=32, n_layer=3, n_head=4,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         tie_word_embeddings=not args.untied, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    else:
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        if args.rope_scaling:
            rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8, "rope_theta": 500000.0}
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=32, intermediate_size=88, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=args.kv_heads, max_position_embeddings=32,
                          rms_norm_eps=1e-5, rope_parameters=rope, tie_word_embeddings=args.tied,
                          bos_token_id=0, eos_token_id=0, pad_token_id=None)
        model = LlamaForCausalLM(cfg)
    # Random weights everywhere (norms too), so that a wrong mapping cannot hide behind ones.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.dim() == 1 else 0.05)
            if p.dim() == 1:
                p.add_(1.0)
    model.save_pretrained(f"{args.out}/model")
    model.train()
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (2, 16), generator=g)
    tgt = torch.randint(0, args.vocab, (2, 16), generator=g)
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), tgt.reshape(-1))
    loss.backward()
    out = {"ids": ids, "targets": tgt, "logits": logits.detach().contiguous(), "loss": loss.detach().reshape(1)}
    for name, p in model.named_parameters():
        out["grad." + name] = p.grad.detach().contiguous()
    save_file(out, f"{args.out}/ref.safetensors")


def compare(args):
    """Exit 0 when DIR_A and DIR_B hold the same tensors, bit for bit; prints the first difference."""
    def tensors(d):
        idx = f"{d}/model.safetensors.index.json"
        try:
            files = sorted(set(json.load(open(idx))["weight_map"].values()))
        except FileNotFoundError:
            files = ["model.safetensors"]
        out = {}
        for f in files:
            out.update(load_file(f"{d}/{f}"))
        return out

    a, b = tensors(args.a), tensors(args.b)
    if a.keys() != b.keys():
        print(f"names differ: {sorted(a.keys() ^ b.keys())}")
        sys.exit(1)
    for k in a:
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
            print(f"{k} differs: {a[k].dtype}{tuple(a[k].shape)} vs {b[k].dtype}{tuple(b[k].shape)}")
            sys.exit(1)
    print(f"{len(a)} tensors identical")


def logits(args):
    """Loads DIR with transformers (no code of ours) and writes its logits for the ids in IDS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32)
    model.eval()
    ids = load_file(args.ids)["ids"]
    with torch.no_grad():
        out = model(input_ids=ids).logits
    save_file({"logits": out.contiguous()}, args.out)
    print(type(model).__name__)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--arch", choices=["gpt2", "llama"], required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--vocab", type=int, default=101)
    m.add_argument("--kv-heads", type=int, default=4)
    m.add_argument("--rope-scaling", action="store_true")
    m.add_argument("--tied", action="store_true", help="llama: tie the embeddings")
    m.add_argument("--untied", action="store_true", help="gpt2: untie the embeddings")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    lg = sub.add_parser("logits")
    lg.add_argument("dir")
    lg.add_argument("--ids", required=True)
    lg.add_argument("--out", required=True)
    a = p.parse_args()
    {"make": make, "compare": compare, "logits": logits}[a.cmd](a)
