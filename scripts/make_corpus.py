"""Writes the default training corpus: real text already on the machine, no download.

It concatenates the top-level modules of the Python standard library that the venv's
interpreter uses (sorted by name, so the corpus is the same on every machine with the same
Python), each behind a `# file: NAME` header, up to --max-bytes.
"""
import argparse
import os
import sysconfig

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--max-bytes", type=int, default=3_000_000)
args = ap.parse_args()

stdlib = sysconfig.get_paths()["stdlib"]
parts, total = [], 0
for name in sorted(os.listdir(stdlib)):
    path = os.path.join(stdlib, name)
    if not name.endswith(".py") or not os.path.isfile(path):
        continue
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f"# file: {name}\n" + f.read() + "\n"
    if total + len(text.encode()) > args.max_bytes:
        break
    parts.append(text)
    total += len(text.encode())

os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
tmp = args.out + ".tmp"
with open(tmp, "w", encoding="utf-8") as f:
    f.write("".join(parts))
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, args.out)
print(f"corpus: {len(parts)} files, {total} bytes from {stdlib} -> {args.out}")
