"""Fused graph against optimum's, family by family, at a size where speed means something.

    python benchmarks/generality/speed.py [--families gpt2 gpt_neox ...] [--rounds 3] [--threads 2] [--tag T]

Each family gets a random model of 12 layers × 768 (the shape of GPT-2 small / OPT-125m / Pythia-160m) with
the tests' 512-token tokenizer (``tests/tiny.py``), built int4 with ``--graph fused`` and ``--graph optimum``
(context 512). ``edgepack bench`` (each in its own process) then measures both packages of every family in
interleaved rounds; the table gives each round's decode tokens/s and first-token ms, and the median ratio.
Random weights and a small vocabulary: the LM head is cheap here, so the figures compare the decoder layers;
they are not a real model's speed. Writes ``results/speed.md`` and ``results/speed.png``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

from common import folder_size, markdown_table, results_dir  # noqa: E402

SHAPE = {"layers": 12, "hidden": 768, "heads": 12, "ffn": 3072}
FAMILIES = ("llama", "gpt2", "gpt_neox", "opt", "falcon", "phi", "gptj", "cohere", "qwen3_moe", "gpt_bigcode",
            "gpt_neo", "nemotron", "lfm2", "codegen", "bloom", "mpt", "xglm", "gpt_oss", "mamba", "granitemoehybrid",
            "falcon_h1")
GRAPHS = ("fused", "optimum")


def _config(family: str):
    import transformers

    s, ids = SHAPE, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "vocab_size": 512}
    return {
        "llama": lambda: transformers.LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["ffn"],
                                                  num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                                  num_key_value_heads=4, tie_word_embeddings=True, **ids),
        "gpt2": lambda: transformers.GPT2Config(n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"], **ids),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=s["hidden"], intermediate_size=s["ffn"],
                                                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                                       rotary_pct=0.25, **ids),
        "opt": lambda: transformers.OPTConfig(hidden_size=s["hidden"], ffn_dim=s["ffn"], num_hidden_layers=s["layers"],
                                              num_attention_heads=s["heads"], word_embed_proj_dim=s["hidden"], **ids),
        # Falcon's newer layout with 4 key-value groups (optimum cannot export it: fused only)
        "falcon": lambda: transformers.FalconConfig(hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                                                    num_attention_heads=s["heads"], new_decoder_architecture=True,
                                                    num_kv_heads=4, **ids),
        "phi": lambda: transformers.PhiConfig(hidden_size=s["hidden"], intermediate_size=s["ffn"],
                                              num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                              partial_rotary_factor=0.5, **ids),
        "gptj": lambda: transformers.GPTJConfig(n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                                                rotary_dim=32, **ids),
        # 8 experts of 768 (the MLP's 3072 split four ways), 2 a token: a quarter of the MLP weights read per token
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(hidden_size=s["hidden"], moe_intermediate_size=s["ffn"] // 4,
                                                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                                         num_key_value_heads=4, head_dim=64, **ids),
        # one key-value head (multi-query), as StarCoder 1 and SantaCoder
        "gpt_bigcode": lambda: transformers.GPTBigCodeConfig(n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                                                             multi_query=True, **ids),
        # global and local (256-position window) layers in turn, as GPT-Neo 125M
        "gpt_neo": lambda: transformers.GPTNeoConfig(hidden_size=s["hidden"], num_layers=s["layers"],
                                                     num_heads=s["heads"], attention_types=[[["global", "local"], 6]],
                                                     **ids),
        # squared-ReLU plain MLP, LayerNorm by 1 + w, half of each 64-wide head rotated, 4 key-value heads
        "nemotron": lambda: transformers.NemotronConfig(hidden_size=s["hidden"], intermediate_size=s["ffn"],
                                                        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                                        num_key_value_heads=4, head_dim=64, partial_rotary_factor=0.5,
                                                        tie_word_embeddings=True, **ids),
        # convolution, convolution, attention, ... (LFM2-350M's pattern; optimum cannot export it: fused only)
        "lfm2": lambda: transformers.Lfm2Config(hidden_size=s["hidden"], intermediate_size=s["ffn"],
                                                num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                                num_key_value_heads=4, block_auto_adjust_ff_dim=False,
                                                layer_types=["full_attention" if i % 3 == 2 else "conv"
                                                             for i in range(s["layers"])], **ids),
        "codegen": lambda: transformers.CodeGenConfig(n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                                                      rotary_dim=32, **ids),
        # GPT-OSS's layout: 8 experts of 768 with biases, 2 a token, attention sinks, sliding and full layers in turn
        "gpt_oss": lambda: transformers.GptOssConfig(hidden_size=s["hidden"], intermediate_size=s["ffn"] // 4,
                                                     num_local_experts=8, num_experts_per_tok=2,
                                                     num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                                     num_key_value_heads=4, head_dim=64, sliding_window=128, **ids),
        # mamba-130m's layers (inner 1536, state 16, kernel 4), 12 of them (optimum cannot export it: fused only)
        "mamba": lambda: transformers.MambaConfig(hidden_size=s["hidden"], num_hidden_layers=s["layers"], state_size=16,
                                                  expand=2, conv_kernel=4, **ids),
        # granite-4.0-h-1b's pattern at this size: Mamba 2 layers (24 heads of 64, state 128) with attention in one of
        # every four, a dense shared MLP (fused only: optimum cannot export it)
        "granitemoehybrid": lambda: transformers.GraniteMoeHybridConfig(
            hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
            num_key_value_heads=4, num_local_experts=0, shared_intermediate_size=s["ffn"], mamba_n_heads=24,
            mamba_d_head=64, mamba_d_state=128, mamba_expand=2, mamba_d_conv=4,
            layer_types=["attention" if i % 4 == 3 else "mamba" for i in range(s["layers"])], **ids),
        # Falcon-H1-0.5B's pattern at this size: a Mamba 2 mixer (24 heads of 64, state 128) beside attention in every
        # layer (fused only: optimum cannot export it)
        "falcon_h1": lambda: transformers.FalconH1Config(
            hidden_size=s["hidden"], intermediate_size=s["ffn"], num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"], num_key_value_heads=4, mamba_n_heads=24, mamba_d_head=64,
            mamba_d_ssm=1536, mamba_d_state=128, mamba_rms_norm=True, tie_word_embeddings=True, **ids),
        # ALiBi (BLOOM-560m's and MPT's position scheme); XGLM's sinusoidal positions
        "bloom": lambda: transformers.BloomConfig(hidden_size=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                                                  **ids),
        "mpt": lambda: transformers.MptConfig(d_model=s["hidden"], n_layers=s["layers"], n_heads=s["heads"],
                                              expansion_ratio=s["ffn"] // s["hidden"], max_seq_len=2048, **ids),
        "xglm": lambda: transformers.XGLMConfig(d_model=s["hidden"], num_layers=s["layers"], attention_heads=s["heads"],
                                                ffn_dim=s["ffn"], **ids),
        "cohere": lambda: transformers.CohereConfig(hidden_size=s["hidden"], intermediate_size=s["ffn"],
                                                    num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                                    num_key_value_heads=4, **ids),
    }[family]()


def _model(family: str, folder: Path) -> Path:
    import torch
    from tiny import make_tokenizer
    from transformers import AutoModelForCausalLM

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(_config(family)).save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
    return folder


def _build(src: Path, graph: str, out: Path) -> tuple[bool, str]:
    if (out / "manifest.json").exists():
        return True, "reused"
    cmd = [sys.executable, "-m", "edgepack.runtime.cli", "build", str(src), "-o", str(out), "--int4", "--graph", graph,
           "--context", "512"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return proc.returncode == 0, last[:200]


def main() -> None:
    from edgepack.runtime.bench import BenchConfig, bench
    from tqdm import tqdm

    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--work", default="/tmp/edgepack-family-speed")
    ap.add_argument("--tag", default="", help="write results/speed-TAG.md / .png (a subset of families)")
    args = ap.parse_args()
    work = Path(args.work)
    packages, notes = {}, []
    for family in tqdm(args.families, desc="models and builds"):
        src = _model(family, work / family / "src")
        for graph in GRAPHS:
            ok, last = _build(src, graph, work / family / graph)
            if ok:
                packages[family, graph] = work / family / graph
            else:
                notes.append(f"- {family}, `--graph {graph}`: not built ({last})")
    config = BenchConfig(max_new_tokens=args.max_tokens, threads=args.threads)
    runs: dict[tuple[str, str], list] = {key: [] for key in packages}
    start = time.time()
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for key, pkg in packages.items():  # interleaved: every package once a round
            runs[key].append(bench(pkg, config))
    rows = []
    for family in args.families:
        cells = [family]
        for graph in GRAPHS:
            reports = runs.get((family, graph))
            cells += ([" / ".join(f"{r.tokens_per_s:.0f}" for r in reports),
                       " / ".join(f"{r.first_token_ms:.0f}" for r in reports),
                       f"{max(r.peak_rss_bytes for r in reports) / 2**20:.0f}",
                       f"{folder_size(packages[family, graph]) / 2**20:.1f}"] if reports else ["—"] * 4)
        both = runs.get((family, "fused")) and runs.get((family, "optimum"))
        cells.append(f"{statistics.median(f.tokens_per_s / o.tokens_per_s for f, o in zip(runs[family, 'fused'], runs[family, 'optimum'])):.2f}"  # noqa: E501
                     if both else "—")
        rows.append(cells)
    headers = ["family", "fused tokens/s", "fused first token (ms)", "fused peak RSS (MiB)", "fused MiB",
               "optimum tokens/s", "optimum first token (ms)", "optimum peak RSS (MiB)", "optimum MiB",
               "decode ratio (median of rounds)"]
    out = results_dir(__file__)
    subset = f" --families {' '.join(args.families)} --tag {args.tag}" if args.tag else ""
    text = (f"# Fused graph against optimum's, by family\n\nCommand: `python benchmarks/generality/speed.py "
            f"--rounds {args.rounds} --threads {args.threads}{subset}`; random models of {SHAPE['layers']} layers × "
            f"{SHAPE['hidden']}, 512-token vocabulary, int4, context 512, `edgepack bench` with "
            f"{args.max_tokens} new tokens per prompt, {args.threads} threads, packages interleaved round by "
            f"round ({time.time() - start:.0f} s of benchmarking). Cells list each round.\n\n"
            + markdown_table(headers, rows) + ("\n" + "\n".join(notes) + "\n" if notes else ""))
    stem = f"speed-{args.tag}" if args.tag else "speed"
    (out / f"{stem}.md").write_text(text, encoding="utf-8")
    _plot(args.families, runs, out / f"{stem}.png")
    print(text)


def _plot(families: list[str], runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    for j, graph in enumerate(GRAPHS):
        values = [statistics.median(r.tokens_per_s for r in runs[f, graph]) if runs.get((f, graph)) else 0.0
                  for f in families]
        ax.bar([i + (j - 0.5) * width for i in range(len(families))], values, width, label=f"--graph {graph}")
    ax.set_xticks(range(len(families)), families)
    ax.set_ylabel("decode tokens/s (median of rounds)")
    ax.set_title("int4, random 12 × 768 models, 2-core host")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
