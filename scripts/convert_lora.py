"""Convert a Lumina-2 / Z-Image LoRA of any key layout to ComfyUI-native layout.

Usage: python scripts/convert_lora.py IN.safetensors OUT.safetensors [--model TRANSFORMER.safetensors]

The output (``diffusion_model.<module>.lora_up/lora_down/alpha``, split q/k/v fused into qkv) loads in
ComfyUI's stock LoraLoader with no warning. ``--model`` (a transformer file, ComfyUI or diffusers
names, or a diffusers folder; only headers are read) sizes the q/k/v slices and checks every shape. Written to a temp file
and renamed; an existing OUT is kept unless --overwrite. Needs no ComfyUI.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_import import register_pack


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="the LoRA to convert (.safetensors, any supported layout)")
    parser.add_argument("output", type=Path, help="where to write the ComfyUI-native LoRA")
    parser.add_argument(
        "--model", type=Path, help="the transformer the LoRA is for (sizes and checks shapes)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.overwrite:
        print(f"error: output: {args.output} exists (use --overwrite)", file=sys.stderr)
        return 2
    register_pack()
    from lumina_turbo.lora import apply as lora_apply

    try:
        shapes = lora_apply.transformer_file_shapes(args.model) if args.model else None
        summary = lora_apply.convert_file(args.input, args.output, shapes)
    except ValueError as exc:  # ModelFileError included: names the file and the offending key
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {summary['path']}: {summary['keys_in']} keys in, {summary['keys_out']} out; "
        f"layout was {', '.join(summary['layouts'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
