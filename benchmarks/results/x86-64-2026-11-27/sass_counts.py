"""Static SASS instruction counts of the cutlass backend's kernels in an object file.

    python sass_counts.py fused_gemm_sm90.o /path/to/cuobjdump

One table row per kernel: dtype, ReLU form (told apart by the visitor tree in the mangled name),
all instructions, atomics (ATOM/RED), VOTE, SHFL and global stores (STG).
"""
import re, sys, subprocess
obj = sys.argv[1]
sass = subprocess.run([sys.argv[2], "-sass", obj], capture_output=True, text=True).stdout
funcs = re.split(r"\n\s*Function : ", sass)[1:]
for f in funcs:
    name = f.split("\n", 1)[0]
    if "ReluMaskStore" not in name: continue
    b, h = name.find("bfloat16_t"), name.find("half_t")
    dtype = "bfloat16" if b != -1 and b < h else "float16"
    tree = name[name.find("Sm90TreeVisitor"):]
    kind = "relu" if "Sm90SrcFetch" not in name else ("relu_add" if tree.startswith("Sm90TreeVisitorINS1M_11Sm90ComputeINS_4plus") else "add_relu")
    ins = re.findall(r"/\*[0-9a-f]{4,6}\*/\s+([^;]*);", f)
    ops = [(i.split()[1] if i.startswith("@") else i.split()[0]) for i in ins]
    c = lambda p: sum(1 for o in ops if re.match(p, o))
    print(f"| {dtype} | {kind} | {len(ops)} | {c(r'(ATOM|RED)')} | {c(r'VOTE')} | {c(r'SHFL')} | {c(r'STG')} |")
