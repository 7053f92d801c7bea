"""LM forward throughput to layer 6 of the embedded SmolLM2: TransformerLens vs HF backend.

Measures the tokens/s of what training's live feed does per batch (`run_to_hooks` at
layer 6's residual stream, `activations.batch_rows` rows of 128 tokens), for:
- tl:          model.backend=transformer_lens (stop_at_layer=7);
- hf:          model.backend=hf (forward hook on model.layers.6 that ends the pass);
- hf_manual:   the alternative the HF backend did not take: embeddings, rotary and
               layers 0..6 called by hand (Llama-specific code, here only to measure);
- hf_hidden:   the naive way, a full forward with output_hidden_states=True.
Arms are interleaved round by round and the median round is reported, as the machine
is shared. Results go to benchmarks/results/backends.{json,md}.

    python benchmarks/bench_backends.py                  # 5 rounds of 32 x 128 tokens
    python benchmarks/bench_backends.py --rounds 3 --rows 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=32, help="rows of 128 tokens per forward")
    parser.add_argument("--name", default="backends", help="results file stem")
    args = parser.parse_args()

    from saesweep.config.schema import DatasetConfig, ModelConfig
    from saesweep.data.rows import load_token_rows
    from saesweep.lm.model import load_model

    cpu = torch.device("cpu")
    tl = load_model(ModelConfig(), cpu, None)
    hf = load_model(ModelConfig(backend="hf", hook_point="model.layers.6"), cpu, None)
    data = load_token_rows(DatasetConfig(), tl.tokenizer, eval_rows=8, seed=0)
    tokens = torch.stack([row for _, row in zip(range(args.rows), data.train_iter(0))])

    arms = {
        "tl": lambda: tl.run_to_hooks(tokens, ["blocks.6.hook_resid_post"])[0],
        "hf": lambda: hf.run_to_hooks(tokens, ["model.layers.6"])[0],
        "hf_manual": lambda: manual_to_layer(hf.hf, tokens, 6),
        "hf_hidden": lambda: hidden_states_to_layer(hf.hf, tokens, 6),
    }
    reference = arms["tl"]()
    diffs = {name: float((fn() - reference).abs().max()) for name, fn in arms.items()}  # also warms up
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(args.rounds):
        for name, fn in arms.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{n} {tokens.numel() / s[-1]:.0f} tok/s" for n, s in seconds.items()),
            flush=True,
        )

    n = tokens.numel()
    result = {
        "what": "tokens/s of the LM forward to layer 6 (resid_post) of SmolLM2-135M, fp32, median of rounds",
        "tokens_per_forward": n,
        "rounds": args.rounds,
        "tokens_per_second": {k: n / statistics.median(v) for k, v in seconds.items()},
        "tokens_per_second_best": {k: n / min(v) for k, v in seconds.items()},
        "max_abs_diff_vs_tl": diffs,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15": os.getloadavg(),
            "note": "shared machine: other jobs ran at the same time; compare arms within this run only",
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    tps, best = result["tokens_per_second"], result["tokens_per_second_best"]
    lines = [
        "# LM forward to layer 6: TransformerLens vs the HF backend",
        "",
        f"`python benchmarks/bench_backends.py --rounds {args.rounds} --rows {args.rows}`: "
        f"{n} tokens per forward, median (best) of {args.rounds} interleaved rounds, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, load average at the end "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} (shared machine: noisy).",
        "",
        "| arm | tokens/s | best | vs tl | max abs diff vs tl |",
        "|---|---|---|---|---|",
        *[f"| {k} | {tps[k]:.0f} | {best[k]:.0f} | {tps[k] / tps['tl']:.2f}x | {diffs[k]:.1e} |" for k in arms],
        "",
        "tl = `model.backend=transformer_lens`, hf = `model.backend=hf` (what training uses),",
        "hf_manual = layers called by hand (not used: Llama-specific), hf_hidden = full forward",
        "with output_hidden_states. Differences are float32 rounding at |x| ~ 500 (massive activations).",
    ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


@torch.inference_mode()
def manual_to_layer(hf: torch.nn.Module, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    from transformers.masking_utils import create_causal_mask

    base = hf.model
    x = base.embed_tokens(tokens)
    positions = torch.arange(tokens.shape[1])[None]
    mask = create_causal_mask(
        config=base.config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=positions
    )
    rotary = base.rotary_emb(x, position_ids=positions)
    for block in base.layers[: layer + 1]:
        x = block(x, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
    return x


@torch.inference_mode()
def hidden_states_to_layer(hf: torch.nn.Module, tokens: torch.Tensor, layer: int) -> torch.Tensor:
    return hf(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states[layer + 1]


if __name__ == "__main__":
    sys.exit(main())
