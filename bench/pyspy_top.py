#!/usr/bin/env python3
"""Summarise a `py-spy record --format raw` file: top self and inclusive frames.

    py-spy record --pid PID --duration 8 --format raw -o prof.raw --nonblocking
    python bench/pyspy_top.py prof.raw [N]
"""
import collections
import sys

path = sys.argv[1]
top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
self_c: collections.Counter[str] = collections.Counter()
by_file: collections.Counter[str] = collections.Counter()
by_func: collections.Counter[str] = collections.Counter()
incl: collections.Counter[str] = collections.Counter()
total = 0
for line in open(path):
    stack, _, n = line.rstrip().rpartition(" ")
    if not n.isdigit():
        continue
    frames = stack.split(";")
    total += int(n)
    self_c[frames[-1]] += int(n)
    leaf = frames[-1]
    where = leaf[leaf.find("(") + 1: leaf.rfind(")")].rsplit(":", 1)[0] if "(" in leaf else "?"
    by_file[where.split("site-packages/")[-1]] += int(n)
    by_func[leaf.split(" (")[0] + " (" + where.split("/")[-1] + ")"] += int(n)
    for f in set(frames):
        incl[f] += int(n)
print(f"samples: {total}")
print("self:")
for f, n in self_c.most_common(top):
    print(f"  {100 * n / total:5.1f}%  {f}")
print("self, by function:")
for f, n in by_func.most_common(top):
    print(f"  {100 * n / total:5.1f}%  {f}")
print("self, by file:")
for f, n in by_file.most_common(top):
    print(f"  {100 * n / total:5.1f}%  {f}")
print("inclusive (py-spy often cannot walk a coroutine's stack to its root: undercounts):")
for f, n in incl.most_common(top + 15):
    print(f"  {100 * n / total:5.1f}%  {f}")
