#!/usr/bin/env python3
"""How fast can an exact int8 product run on an AVX2 CPU without VNNI? Standalone loops.

The AVX2 target of the kernels issue is a share of the `vpmaddubsw` chain's peak, but that
chain saturates (`255 * 127 * 2 > 32767`) and dynq cannot use it for 8-bit weights. This
script measures, on the CPU it runs on, the inner steps that could compute the same exact
product, so that the distance between dynq's kernel and that peak can be read as a property of
the CPU, not of the code around the loop. Every loop keeps its operands in registers or L1 (no
memory traffic beyond a few cache lines), fixes its registers in assembly, and is timed
alternately with the others; the best of the rounds is printed.

Tile steps (GOPS = 2 x multiply-adds per second; % = of the chain):
- chain 6x16: the `vpmaddubsw + vpmaddwd(ones) + vpaddd` chain on a 6 x 16 tile, K in groups
  of 4: the peak `dynq peak` reports on such CPUs. Exact only for narrow weights.
- exact 6x16: dynq's AVX2 step (`gemm_u8s8_i32_6x16c2__avx2`): weights widened with
  `vpmovsxbw`, 6 broadcast activation pairs, 12 `vpmaddwd`, 12 `vpaddd`.
- wide 6x16: the same step on weights widened to int16 when packed (twice the bytes), so plain
  loads replace the sign extensions: whether the `vpmovsxbw` costs anything.
- sign 5x16: symmetric activations made exact with the sign trick,
  `vpmaddubsw(|a|, vpsignb(w, a))` (`|a| <= 128`, `|w| <= 127`: no saturation), 5 rows (the
  16 registers allow no more).

Port probes (12 independent accumulators, registers only): how many times per nanosecond the CPU
completes `vpmaddwd` alone, `vpmaddwd` + `vpaddd`, `vpaddd` alone, and the whole chain, and the
multiply-adds that makes. On AMD Zen 3 (2026-11-30): 6.48, 5.16, 12.34 and 3.14 per ns, so adding
the `vpaddd` that an exact `vpmaddwd` product needs costs 20% of the multiplier's rate (82.6
against 103.7 multiply-adds per ns), where the chain keeps 100.5: the exact step is bound
near 85% of the chain's peak before any memory traffic.

    python3 bench/avx2_steps.py [--rounds 60]

Needs gcc (or $CC) and an x86-64 CPU with AVX2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

K = 768  # K of the tile loops: 12 KiB of weights per tile, in L1 with the activations
ROW_STRIDE = 4096  # bytes between the activation rows


def tile_loops() -> list[str]:
    """Assembly of the three tile steps. SysV: rdi = rounds, rsi = A, rdx = B, rcx = ones."""
    out: list[str] = []

    def func(name: str, body: list[str], steps: int, b_step: int, a_step: int, acc: int, ones_in_reg: bool) -> None:
        out.append(f".globl {name}\n.type {name}, @function\n{name}:")
        if ones_in_reg:
            out.append("  vmovdqa ymm15, [rcx]")
        out.append(f"1:\n  mov rax, rdx\n  xor r9, r9\n  mov r8, {steps}")
        out.extend(f"  vpxor ymm{i}, ymm{i}, ymm{i}" for i in range(acc))
        out.append("2:")
        out.extend(body)
        out.append(f"  add rax, {b_step}\n  add r9, {a_step}\n  dec r8\n  jnz 2b\n  dec rdi\n  jnz 1b\n  vzeroupper\n  ret")

    body = ["  vmovdqu ymm12, [rax]", "  vmovdqu ymm13, [rax+32]"]
    for i in range(6):
        a = f"[rsi+r9+{i * ROW_STRIDE}]"
        for w, acc, t in ((12, 2 * i, 15), (13, 2 * i + 1, 14)):
            if w == 12:
                body.append(f"  vpbroadcastd ymm14, {a}")
            body += [f"  vpmaddubsw ymm{t}, ymm14, ymm{w}", f"  vpmaddwd ymm{t}, ymm{t}, [rcx]", f"  vpaddd ymm{acc}, ymm{acc}, ymm{t}"]
    func("chain_6x16", body, K // 4, 64, 4, 12, False)

    body = ["  vpmovsxbw ymm12, [rax]", "  vpmovsxbw ymm13, [rax+16]"]
    for i in range(6):
        body += [
            f"  vpbroadcastd ymm14, [rsi+r9+{i * ROW_STRIDE}]",
            "  vpmaddwd ymm15, ymm14, ymm12",
            f"  vpaddd ymm{2 * i}, ymm{2 * i}, ymm15",
            "  vpmaddwd ymm14, ymm14, ymm13",
            f"  vpaddd ymm{2 * i + 1}, ymm{2 * i + 1}, ymm14",
        ]
    func("exact_6x16", body, K // 2, 32, 4, 12, False)

    # The same step with the weights widened to int16 when packed (twice the bytes): plain loads
    # instead of the sign extensions.
    body = ["  vmovdqu ymm12, [rax]", "  vmovdqu ymm13, [rax+32]"] + body[2:]
    func("wide_6x16", body, K // 2, 64, 4, 12, False)

    # Activation rows hold, per group of 4, the signed bytes and then their magnitudes.
    body = ["  vmovdqu ymm10, [rax]", "  vmovdqu ymm11, [rax+32]"]
    for i in range(5):
        body += [f"  vpbroadcastd ymm12, [rsi+r9+{i * ROW_STRIDE}]", f"  vpbroadcastd ymm13, [rsi+r9+{i * ROW_STRIDE + 4}]"]
        for w, acc in ((10, 2 * i), (11, 2 * i + 1)):
            body += [
                f"  vpsignb ymm14, ymm{w}, ymm12",
                "  vpmaddubsw ymm14, ymm13, ymm14",
                "  vpmaddwd ymm14, ymm14, ymm15",
                f"  vpaddd ymm{acc}, ymm{acc}, ymm14",
            ]
    func("sign_5x16", body, K // 4, 64, 8, 10, True)
    return out


def probe_loops() -> list[str]:
    """Port probes: 8 x 12 instructions (or chains) per round. rdi = rounds."""
    out: list[str] = []

    def func(name: str, body: list[str]) -> None:
        out.append(f".globl {name}\n.type {name}, @function\n{name}:\n1:")
        out.extend(body * 8)
        out.append("  dec rdi\n  jnz 1b\n  vzeroupper\n  ret")

    func("p_madd", [f"  vpmaddwd ymm{i}, ymm12, ymm13" for i in range(12)])
    func("p_madd_add", [x for i in range(12) for x in ("  vpmaddwd ymm14, ymm12, ymm13", f"  vpaddd ymm{i}, ymm{i}, ymm14")])
    func("p_add", [f"  vpaddd ymm{i}, ymm{i}, ymm13" for i in range(12)])
    func(
        "p_chain",
        [
            x
            for i in range(12)
            for x in ("  vpmaddubsw ymm14, ymm12, ymm13", "  vpmaddwd ymm14, ymm14, ymm15", f"  vpaddd ymm{i}, ymm{i}, ymm14")
        ],
    )
    return out


DRIVER = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
typedef void Tile(long, const void *, const void *, const void *);
typedef void Probe(long);
Tile chain_6x16, exact_6x16, wide_6x16, sign_5x16;
Probe p_madd, p_madd_add, p_add, p_chain;
static int8_t B[KDIM * 32] __attribute__((aligned(64)));
static uint8_t A[6 * STRIDE] __attribute__((aligned(64)));
static int16_t ONES[16] __attribute__((aligned(64)));
int main(int argc, char **argv) {
    int rounds = atoi(argv[1]);
    for (int i = 0; i < 16; i++) ONES[i] = 1;
    for (size_t i = 0; i < sizeof B; i++) B[i] = (int8_t)(i * 37 % 255 - 127);
    for (size_t i = 0; i < sizeof A; i++) A[i] = (uint8_t)(i * 11);
    Tile *tiles[4] = {chain_6x16, exact_6x16, wide_6x16, sign_5x16};
    const char *tname[4] = {"chain 6x16", "exact 6x16", "wide 6x16", "sign 5x16"};
    double rows[4] = {6, 6, 6, 5}, best[4] = {0};
    Probe *probes[4] = {p_madd, p_madd_add, p_add, p_chain};
    const char *pname[4] = {"vpmaddwd", "vpmaddwd + vpaddd", "vpaddd", "vpmaddubsw + vpmaddwd + vpaddd"};
    double pmacs[4] = {16, 16, 0, 32};
    double pbest[4] = {0};
    long reps = 2000, preps = 100000;
    for (int r = 0; r < rounds; r++) {
        for (int j = 0; j < 4; j++) {
            double t = now();
            tiles[j](reps, A, B, ONES);
            double g = 2.0 * rows[j] * 16 * KDIM * reps / (now() - t) / 1e9;
            if (g > best[j]) best[j] = g;
        }
        for (int j = 0; j < 4; j++) {
            double t = now();
            probes[j](preps);
            double g = 96.0 * preps / (now() - t) / 1e9;
            if (g > pbest[j]) pbest[j] = g;
        }
    }
    for (int j = 0; j < 4; j++) printf("tile  %-12s %7.1f GOPS  %4.0f%%\n", tname[j], best[j], 100 * best[j] / best[0]);
    for (int j = 0; j < 4; j++) {
        printf("probe %-32s %6.2f per ns", pname[j], pbest[j]);
        if (pmacs[j] > 0) printf("  %6.1f multiply-adds per ns", pbest[j] * pmacs[j]);
        printf("\n");
    }
    return 0;
}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=60, help="alternating rounds; the best of each loop is kept")
    args = ap.parse_args()
    with open("/proc/cpuinfo") as f:
        flags = next((line.split() for line in f if line.startswith("flags")), [])
    if "avx2" not in flags:
        print("avx2_steps.py: this CPU has no AVX2", file=sys.stderr)
        return 1
    cc = os.environ.get("CC", "gcc")
    with tempfile.TemporaryDirectory() as d:
        asm = [".intel_syntax noprefix", ".text", *tile_loops(), *probe_loops(), '.section .note.GNU-stack,"",@progbits']
        with open(os.path.join(d, "loops.S"), "w") as f:
            f.write("\n".join(asm) + "\n")
        with open(os.path.join(d, "main.c"), "w") as f:
            f.write(DRIVER)
        exe = os.path.join(d, "steps")
        subprocess.run(
            [cc, "-O2", f"-DKDIM={K}", f"-DSTRIDE={ROW_STRIDE}", "-o", exe, os.path.join(d, "main.c"), os.path.join(d, "loops.S")],
            check=True,
        )
        model = next((" ".join(line.split(":", 1)[1].split()) for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
        print(f"# {model}; best of {args.rounds} alternating rounds, 1 thread")
        sys.stdout.flush()
        subprocess.run([exe, str(args.rounds)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
