"""The order of a native-kernel instantiation's memory operations in PTX, one letter each.

    L ld.global   S st.shared   | bar.sync   M tensor-core or float64 multiply-adds   G st.global

Usage: python ptx_memory_order.py tile_kernels.ptx [more.ptx ...]
(PTX from `nvcc -ptx csrc/cuda/tile_kernels.cu -arch=sm_90a` with the build's flags; see README.md.)
"""
import re
import sys

# Representative instantiations: bfloat16 tensor cores, forward (ReLU, relu_add, bias) and
# backward; float64 SIMT likewise.
WANTED = {
    "bf16 forward relu_add+bias": "WmmaMathIN3c108BFloat16EEELb1ELNS_8ResidualE1ELb1ENS_10TileParamsIS4_Li8E",
    "bf16 backward": "WmmaMathIN3c108BFloat16EEELb0ELNS_8ResidualE0ELb0ENS_10TileParamsIS4_Li1ELi17E",
    "f64 forward relu_add+bias": "SimtMathIdEELb1ELNS_8ResidualE1ELb1ENS_10TileParamsIdLi8E",
    "f64 backward": "SimtMathIdEELb0ELNS_8ResidualE0ELb0ENS_10TileParamsIdLi1ELi17E",
}


def entries(text):
    out = {}
    for part in re.split(r"\n(?=\.visible \.entry|\.entry)", text):
        m = re.match(r"(?:\.visible )?\.entry (\S+)\(", part)
        if m:
            out[m.group(1)] = part
    return out


def order(body):
    seq = []
    for line in body.split("\n"):
        line = line.strip()
        if line.startswith("ld.global"):
            seq.append("L")
        elif line.startswith("st.shared"):
            seq.append("S")
        elif line.startswith("bar.sync"):
            seq.append("|")
        elif line.startswith("st.global"):
            seq.append("G")
        elif line.startswith(("wmma.mma", "fma.rn.f64")) and (not seq or seq[-1] != "M"):
            seq.append("M")
    return "".join(seq)


for path in sys.argv[1:]:
    kernels = entries(open(path).read())
    print(f"# {path}")
    for label, key in WANTED.items():
        (name,) = [n for n in kernels if key in n]
        print(f"{label:28s} {order(kernels[name])}")
