"""Write a tiny random Hugging Face checkpoint (weights, config, tokenizer) for a quick end-to-end run.

    python scripts/make_tiny_model.py /tmp/sgjax-tiny [--family llama|mistral|qwen2|qwen3|gemma2]
"""

import argparse

from sgjax.testing.tiny_models import FAMILIES, make_tiny_model

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--family", default="llama", choices=sorted(FAMILIES))
    args = parser.parse_args()
    make_tiny_model(args.path, args.family)
    print(f"wrote a tiny {args.family} checkpoint to {args.path}")
